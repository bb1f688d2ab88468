"""Link tokens survive a secret rotation (``[email] secret_previous``) and have exactly one
spelling: padding, junk and other respellings of the same bytes are refused."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from segflowd.config import load_config
from segflowd.delivery.tokens import Signer
from segflowd.errors import ConfigError, TokenError

CLAIMS = {"u": "u1", "m": 7}
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def test_tokens_signed_with_a_previous_secret_still_verify() -> None:
    old_token = Signer("old").sign("u", CLAIMS)
    older_token = Signer("older").sign("u", CLAIMS)
    rotated = Signer("new", previous=["old", b"older"])
    assert rotated.verify("u", old_token) == CLAIMS
    assert rotated.verify("u", older_token) == CLAIMS
    with pytest.raises(TokenError):  # the control: without previous, rotation kills links
        Signer("new").verify("u", old_token)
    with pytest.raises(TokenError):  # a previous secret is no licence to change the purpose
        rotated.verify("o", old_token)


def test_only_the_current_secret_signs() -> None:
    token = Signer("new", previous=["old"]).sign("u", CLAIMS)
    assert Signer("new").verify("u", token) == CLAIMS
    with pytest.raises(TokenError):
        Signer("old").verify("u", token)


def test_a_token_no_secret_signed_is_refused_whatever_the_previous_secrets() -> None:
    forged = Signer("guess").sign("u", CLAIMS)
    with pytest.raises(TokenError, match="does not verify"):
        Signer("new", previous=["old", "older"]).verify("u", forged)


def test_an_empty_previous_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        Signer("new", previous=["old", ""])


def respellings(token: str) -> list[str]:
    """Spellings of ``token`` that old, lenient base64 decoding read as the same bytes."""
    payload, mac = token.split(".")
    out = [token + "=", token + "==", token + "====", f"{payload}=.{mac}", f"{payload}==.{mac}",
           token + "!", token + "!!", token + "!!!!", token + "=A", token + "~~~~",
           token + "\n", token + " ", token + "  ", token + "%00", token + "~",
           f"{payload}.{mac[:4]} {mac[4:]}", f"{payload}.{mac[:4]}\t{mac[4:]}",
           f"{payload}!.{mac}", f"*{payload}.{mac}",
           token.replace("-", "+").replace("_", "/")]  # standard, not URL-safe, alphabet
    for part, index in ((mac, 1), (payload, 0)):
        # The last character's spare bits (not part of any byte) set another way.
        spare = {2: 0b1111, 3: 0b11}.get(len(part) % 4)
        if spare:
            last = B64.index(part[-1])
            for bits in range(1, spare + 1):
                if last ^ bits != last:
                    respelt = part[:-1] + B64[last ^ bits]
                    pieces = [payload, mac]
                    pieces[index] = respelt
                    out.append(".".join(pieces))
    return [t for t in out if t != token]


def test_every_respelling_of_a_genuine_token_is_refused() -> None:
    signer = Signer("key", previous=["old"])
    for token in (signer.sign("u", CLAIMS), Signer("old").sign("u", CLAIMS),
                  signer.sign("c", {"m": 1, "l": "https://example.com/?a=ü"})):
        purpose = "c" if len(token) > 60 else "u"
        assert signer.verify(purpose, token)  # the control: the spelling as signed
        candidates = respellings(token)
        assert len(candidates) > 15
        for candidate in candidates:
            with pytest.raises(TokenError, match="malformed"):
                signer.verify(purpose, candidate)


def write(tmp_path: Path, email: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(textwrap.dedent("""\
        [daemon]
        app = "flows.py"
        [email]
        """) + textwrap.dedent(email), encoding="utf-8")
    return path


def test_secret_previous_is_a_list_in_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'secret = "new"\nsecret_previous = ["old", "older"]\n')
    assert load_config(path, environ={}).email.secret_previous == ("old", "older")
    assert "old" not in repr(load_config(path, environ={}).email)  # secrets stay out of logs


def test_secret_previous_from_a_file_or_the_environment_is_one_per_line(tmp_path: Path) -> None:
    (tmp_path / "previous").write_text("old\n\nolder\n", encoding="utf-8")
    path = write(tmp_path, 'secret = "new"\nsecret_previous_file = "previous"\n')
    assert load_config(path, environ={}).email.secret_previous == ("old", "older")
    path = write(tmp_path, 'secret = "new"\nsecret_previous_env = "PREVIOUS"\n')
    assert load_config(path, environ={"PREVIOUS": "old"}).email.secret_previous == ("old",)
    path = write(tmp_path, 'secret = "new"\n')
    assert load_config(path, environ={"SEGFLOW_EMAIL_SECRET_PREVIOUS": "a\nb"}
                       ).email.secret_previous == ("a", "b")
    assert load_config(path, environ={}).email.secret_previous == ()


@pytest.mark.parametrize(("email", "key", "message"), [
    ('secret = "new"\nsecret_previous = ["old", ""]\n', "email.secret_previous[1]",
     "non-empty string"),
    ('secret = "new"\nsecret_previous = ["old", 3]\n', "email.secret_previous[1]",
     "non-empty string"),
    ('secret = "new"\nsecret_previous = 3\n', "email.secret_previous", "array of strings"),
    ('secret_previous = ["old"]\n', "email.secret_previous", "needs [email] secret"),
])
def test_a_wrong_secret_previous_is_a_config_error_naming_the_key(
        tmp_path: Path, email: str, key: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, email), environ={})
    assert caught.value.key == key
    assert caught.value.line is not None
    assert message in caught.value.reason
