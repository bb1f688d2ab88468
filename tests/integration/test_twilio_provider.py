"""The twilio SMS provider against a Twilio-shaped HTTP server on loopback (real HTTP).

The server (``tests/twilio_fake.py``) implements Twilio's Messages create call and its
documented answers; each answer class maps to the SendResult that delivery's
at-most-once rules need: sent, failed (suppressed), transient, outage, or maybe sent.
"""

from __future__ import annotations

import base64
import socket
import urllib.parse
from pathlib import Path

import pytest
from twilio_fake import ACCOUNT_SID, AUTH_TOKEN, Answer, FakeTwilio, twilio_error
from twilio_fake import twilio_server as twilio_server  # the fixture, re-exported

from segflow_plugins.twilio import TwilioProvider, signature_valid, twilio_signature
from segflowd.errors import ProviderError
from segflowd.providers import OutgoingSms, ProviderContext, SendResult, load_sms_provider

pytestmark = pytest.mark.anyio

SENDER = "+15005550006"


def provider(server: FakeTwilio, tmp_path: Path, **options: object) -> TwilioProvider:
    opts: dict[str, object] = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                               "from": SENDER, "base_url": server.url, **options}
    return TwilioProvider(ProviderContext("twilio", opts, tmp_path))


def sms(i: int, **kw: str) -> OutgoingSms:
    return OutgoingSms(id=i, to=f"+1415555{i:04d}", body=f"hello {i}", **kw)


def outcome(r: SendResult) -> tuple[bool, bool, bool, bool, bool]:
    return r.ok, r.transient, r.suppress, r.maybe_sent, r.outage


async def test_the_request_is_twilios_form_post_with_basic_auth(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    p = provider(twilio_server, tmp_path)
    try:
        [result] = await p.send([sms(1, status_callback="https://segflow.example/sms/1",
                                     kind="campaign")])
    finally:
        await p.aclose()
    [req] = twilio_server.requests
    assert req.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert req.form == {"To": "+14155550001", "From": SENDER, "Body": "hello 1",
                        "StatusCallback": "https://segflow.example/sms/1"}
    assert req.headers["Content-Type"] == "application/x-www-form-urlencoded"
    scheme, _, cred = req.headers["Authorization"].partition(" ")
    assert (scheme, base64.b64decode(cred).decode()) == ("Basic", f"{ACCOUNT_SID}:{AUTH_TOKEN}")
    assert result.ok
    assert result.provider_message_id == req.sid
    assert result.provider_message_id.startswith("SM")


async def test_a_messaging_service_replaces_from_and_no_callback_means_none_sent(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    p = provider(twilio_server, tmp_path, **{"from": ""}, messaging_service_sid="MG" + "1" * 32)
    try:
        [result] = await p.send([OutgoingSms(7, "+447700900123", "Grüße € {x}")])
    finally:
        await p.aclose()
    assert result.ok
    assert twilio_server.requests[0].form == {
        "To": "+447700900123", "Body": "Grüße € {x}", "MessagingServiceSid": "MG" + "1" * 32}


@pytest.mark.parametrize(("answer", "expected"), [
    # (ok, transient, suppress, maybe_sent, outage)
    (twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
     (False, False, True, False, False)),
    (twilio_error(400, 21211, "Invalid 'To' Phone Number"), (False, False, False, False, False)),
    (twilio_error(400, 21614, "'To' number is not a valid mobile number"),
     (False, False, False, False, False)),
    (twilio_error(400, 21408, "Permission to send an SMS has not been enabled for the region"),
     (False, False, False, False, False)),
    (twilio_error(429, 20429, "Too Many Requests"), (False, True, False, False, False)),
    (twilio_error(400, 14107, "Message rate limit exceeded"), (False, True, False, False, False)),
    (twilio_error(403, 20003, "Permission Denied"), (False, True, False, False, True)),
    (twilio_error(400, 21212, "Invalid 'From' Phone Number"), (False, True, False, False, True)),
    (twilio_error(500, 20500, "Internal Server Error"), (False, True, False, False, True)),
    (twilio_error(503, 20503, "Service Unavailable"), (False, True, False, False, True)),
    (Answer(502, b"<html>Bad Gateway</html>"), (False, False, False, True, False)),
    (Answer(504, b"<html>Gateway Timeout</html>"), (False, False, False, True, False)),
    (Answer(201, b"not json"), (False, False, False, True, False)),
    (Answer(201, {"status": "queued"}), (False, False, False, True, False)),
    (Answer(drop=True), (False, False, False, True, False)),
], ids=["21610-stop", "21211-invalid", "21614-not-mobile", "21408-region", "429", "14107",
        "403-20003", "21212-from", "500", "503", "gateway-502", "gateway-504", "201-garbled",
        "201-no-sid", "dropped"])
async def test_each_answer_class_maps_to_its_outcome(
        twilio_server: FakeTwilio, tmp_path: Path, answer: Answer,
        expected: tuple[bool, bool, bool, bool, bool]) -> None:
    twilio_server.fail_next(answer)
    p = provider(twilio_server, tmp_path)
    try:
        [result] = await p.send([sms(1)])
    finally:
        await p.aclose()
    assert outcome(result) == expected, result
    assert result.error
    assert AUTH_TOKEN not in result.error
    if isinstance(answer.body, dict) and "code" in answer.body:
        assert str(answer.body["code"]) in result.error  # the operator sees Twilio's code


async def test_wrong_credentials_are_an_outage_and_the_token_is_never_shown(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    secret = "wrong-secret-token-123"
    p = provider(twilio_server, tmp_path, auth_token=secret)
    try:
        [result] = await p.send([sms(1)])
    finally:
        await p.aclose()
    assert outcome(result) == (False, True, False, False, True)
    assert "20003" in (result.error or "")
    assert secret not in (result.error or "")
    assert secret not in repr(p)
    assert secret not in str(vars(p))
    assert twilio_server.sent() == []


async def test_another_accounts_sid_is_an_outage(twilio_server: FakeTwilio,
                                                 tmp_path: Path) -> None:
    twilio_server.account_sid = "AC" + "f" * 32  # the token is right, the account is not
    p = provider(twilio_server, tmp_path)
    try:
        [result] = await p.send([sms(1)])
    finally:
        await p.aclose()
    assert outcome(result) == (False, True, False, False, True)


async def test_no_connection_is_certainly_not_sent(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = TwilioProvider(ProviderContext("twilio", {
        "account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN, "from": SENDER,
        "base_url": f"http://127.0.0.1:{port}"}, tmp_path))
    try:
        results = await p.send([sms(1), sms(2)])
    finally:
        await p.aclose()
    assert [outcome(r) for r in results] == [(False, True, False, False, True)] * 2
    assert all(AUTH_TOKEN not in (r.error or "") for r in results)


async def test_a_timeout_after_the_request_went_out_is_maybe_sent(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    twilio_server.fail_to("+14155550002", Answer(delay=30.0))  # stalls past the timeout
    p = provider(twilio_server, tmp_path, timeout=0.5)
    try:
        first, stalled, third = await p.send([sms(1), sms(2), sms(3)])
    finally:
        await p.aclose()
    assert outcome(stalled) == (False, False, False, True, False)
    assert "may have been sent" in (stalled.error or "")
    assert first.ok
    assert third.ok


async def test_a_batch_runs_in_parallel_and_keeps_its_order(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    # Every request waits until 5 are in flight together: a provider that sent one at a
    # time would never get there (the fake gives up after a while and the check below fails).
    twilio_server.hold_until(5)
    twilio_server.fail_to("+14155550003", twilio_error(400, 21211, "Invalid 'To' Phone Number"))
    messages = [sms(i) for i in range(5)]
    p = provider(twilio_server, tmp_path)
    try:
        results = await p.send(messages)
    finally:
        await p.aclose()
    assert twilio_server.max_in_flight == 5
    by_sid = {r.sid: r.form["To"] for r in twilio_server.sent()}
    for msg, result in zip(messages, results, strict=True):
        if msg.to == "+14155550003":
            assert not result.ok
            assert "21211" in (result.error or "")
        else:
            assert result.ok
            assert by_sid[result.provider_message_id or ""] == msg.to


async def test_calls_in_flight_are_bounded_and_connections_kept_alive(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    p = provider(twilio_server, tmp_path)
    try:
        results = await p.send([sms(i) for i in range(30)])
        again = await p.send([sms(99)])
    finally:
        await p.aclose()
    assert all(r.ok for r in [*results, *again])
    assert len(twilio_server.sent()) == 31
    assert twilio_server.max_in_flight <= p.parallel_calls
    ports = {r.client_port for r in twilio_server.requests}
    assert len(ports) <= p.parallel_calls  # 31 calls over at most 10 kept-alive connections


async def test_the_entry_point_builds_it_with_a_token_from_a_file(
        twilio_server: FakeTwilio, tmp_path: Path) -> None:
    (tmp_path / "twilio-token").write_text(AUTH_TOKEN + "\n")
    p = load_sms_provider(ProviderContext("sms", {
        "plugin": "twilio", "account_sid": ACCOUNT_SID, "auth_token_file": "twilio-token",
        "from": SENDER, "base_url": twilio_server.url, "rate": 5}, tmp_path))
    try:
        assert isinstance(p, TwilioProvider)
        [result] = await p.send([sms(1)])
    finally:
        await p.aclose()
    assert result.ok


async def test_a_token_from_the_environment(twilio_server: FakeTwilio, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEGFLOW_TEST_TWILIO_TOKEN", AUTH_TOKEN)
    p = TwilioProvider(ProviderContext("twilio", {
        "account_sid": ACCOUNT_SID, "auth_token_env": "SEGFLOW_TEST_TWILIO_TOKEN",
        "from": SENDER, "base_url": twilio_server.url}, tmp_path))
    try:
        [result] = await p.send([sms(1)])
    finally:
        await p.aclose()
    assert result.ok


@pytest.mark.parametrize(("options", "message"), [
    ({"auth_token": ""}, "[providers.twilio].auth_token: required (give auth_token, "
                         "auth_token_env or auth_token_file)"),
    ({"auth_token_env": "X"}, "either auth_token or auth_token_env, not both"),
    ({"account_sid": "AC123"}, "[providers.twilio].account_sid: must be a Twilio Account SID"),
    ({"messaging_service_sid": "MG1"}, "give exactly one of from"),
    ({"from": ""}, "give exactly one of from"),
    ({"sender": "+1"}, "unknown option(s) sender"),
    ({"max_batch": 0}, "[providers.twilio].max_batch: must be 1..1000"),
    ({"timeout": "soon"}, "[providers.twilio].timeout: must be a number"),
])
def test_bad_options_are_named(tmp_path: Path, options: dict[str, object],
                               message: str) -> None:
    opts: dict[str, object] = {"account_sid": ACCOUNT_SID, "auth_token": AUTH_TOKEN,
                               "from": SENDER, **options}
    with pytest.raises(ProviderError) as info:
        TwilioProvider(ProviderContext("twilio", opts, tmp_path))
    assert message in str(info.value)
    assert AUTH_TOKEN not in str(info.value)


# -- X-Twilio-Signature ----------------------------------------------------------------

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def doc_params(number: str) -> dict[str, str]:
    return {"CallSid": "CA1234567890ABCDE", "Caller": number, "Digits": "1234",
            "From": number, "To": "+18005551212"}


def test_signature_matches_twilios_published_examples() -> None:
    # Twilio's security page has shown this example with two caller numbers over time;
    # both signatures are the documented algorithm's (computed here, they match).
    assert twilio_signature("12345", DOC_URL, doc_params("+12349013030")) == \
        "0/KCTR6DLpKmkAf8muzZqo1nDgQ="
    assert twilio_signature("12345", DOC_URL, doc_params("+14158675310")) == \
        "GvWf1cFY/Q7PnoempGyD5oXAezc="


def test_signature_does_not_depend_on_the_order_params_are_given() -> None:
    params = doc_params("+14158675310")
    reversed_params = dict(reversed(list(params.items())))
    assert twilio_signature("12345", DOC_URL, reversed_params) == "GvWf1cFY/Q7PnoempGyD5oXAezc="


def test_signature_valid_accepts_only_the_exact_request() -> None:
    params = doc_params("+14158675310")
    good = "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert signature_valid("12345", DOC_URL, params, good)
    assert not signature_valid("12345", DOC_URL, {**params, "Digits": "9999"}, good)
    assert not signature_valid("12345", DOC_URL.replace("bar=2", "bar=3"), params, good)
    assert not signature_valid("54321", DOC_URL, params, good)
    assert not signature_valid("12345", DOC_URL, params, good[:-1])
    assert not signature_valid("12345", DOC_URL, params, "")


def test_signature_valid_tolerates_the_default_port_either_way() -> None:
    params = {"MessageSid": "SM1", "MessageStatus": "delivered"}
    with_port = "https://segflow.example:443/v1/sms/status?x=1"
    without = "https://segflow.example/v1/sms/status?x=1"
    assert signature_valid("tok", without, params, twilio_signature("tok", with_port, params))
    assert signature_valid("tok", with_port, params, twilio_signature("tok", without, params))
    other_port = "https://segflow.example:8443/v1/sms/status?x=1"
    assert not signature_valid("tok", without, params,
                               twilio_signature("tok", other_port, params))


def test_a_status_callback_signed_as_twilio_signs_it_is_valid() -> None:
    """The form body Twilio posts, parsed as a web framework would, verifies."""
    body = "MessageSid=SM123&MessageStatus=undelivered&ErrorCode=30003&To=%2B14155550100"
    params = dict(urllib.parse.parse_qsl(body))
    url = "https://segflow.example/v1/sms/status/42"
    header = twilio_signature(AUTH_TOKEN, url, params)
    assert signature_valid(AUTH_TOKEN, url, params, header)
    assert not signature_valid(AUTH_TOKEN, url, {**params, "MessageStatus": "delivered"},
                               header)
