"""Key scopes: ``[[http.keys]] scope`` in the config, and what each scope lets through."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from segflowd.config import HttpKey, load_config
from segflowd.errors import ConfigError
from segflowd.http import HTTPError, Request
from segflowd.ingest.auth import Authenticator, Need

AUTH = Authenticator([HttpKey("full", "secret-all"), HttpKey("web", "secret-track", "track"),
                      HttpKey("mailer", "secret-app", "app")])
SECRETS = {"all": "secret-all", "track": "secret-track", "app": "secret-app"}
NAMES = {"all": "full", "track": "web", "app": "mailer"}


def request(authorization: str) -> Request:
    scope = {"type": "http", "method": "POST", "path": "/",
             "headers": [(b"authorization", authorization.encode())]}

    async def receive() -> dict[str, object]:  # pragma: no cover - bodies are not read
        return {"type": "http.request", "body": b""}

    return Request(scope, receive, {})


def basic(user: str, password: str = "") -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def passes(scope: str, need: Need) -> bool:
    """Whether a key of ``scope`` passes a route of ``need``, by each protocol."""
    secret, name = SECRETS[scope], NAMES[scope]
    outcomes = []
    refusals: list[HTTPError] = []
    for check in (lambda: AUTH.native(request(f"Bearer {secret}"), need=need),
                  lambda: AUTH.segment(request(basic(secret)), None, need=need),
                  lambda: AUTH.customerio(request(basic(name, secret)), need=need)):
        try:
            outcomes.append(check() == name)
        except HTTPError as exc:
            refusals.append(exc)
            outcomes.append(False)
    for exc in refusals:
        assert (exc.status, exc.code) == (403, "forbidden")
        assert repr(name) in exc.message
        assert repr(scope) in exc.message
    assert len(set(outcomes)) == 1  # the same answer whatever the protocol
    return outcomes[0]


@pytest.mark.parametrize(("scope", "need", "allowed"), [
    ("all", "all", True), ("all", "track", True), ("all", "app", True),
    ("track", "track", True), ("track", "all", False), ("track", "app", False),
    ("app", "app", True), ("app", "all", False), ("app", "track", False),
])
def test_a_key_passes_when_its_scope_is_all_or_the_routes_need(
        scope: str, need: Need, allowed: bool) -> None:
    assert passes(scope, need) is allowed


def test_defaults_native_needs_all_and_tracking_routes_need_track() -> None:
    with pytest.raises(HTTPError) as info:
        AUTH.native(request("Bearer secret-track"))
    assert info.value.status == 403
    assert "scope 'all'" in info.value.message
    assert AUTH.segment(request(basic("secret-track")), None) == "web"
    assert AUTH.customerio(request(basic("web", "secret-track"))) == "web"


def test_a_wrong_secret_is_still_401_not_403() -> None:
    with pytest.raises(HTTPError) as info:
        AUTH.native(request("Bearer nope"), need="track")
    assert info.value.status == 401


def _config(tmp_path: Path, keys: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(f'[daemon]\napp = "app.py:app"\n{keys}')
    return path


def test_scope_defaults_to_all(tmp_path: Path) -> None:
    c = load_config(_config(tmp_path, '[[http.keys]]\nname = "a"\nsecret = "s"\n'), {})
    assert c.http.keys[0].scope == "all"


def test_config_takes_each_scope(tmp_path: Path) -> None:
    keys = "".join(f'[[http.keys]]\nname = "k{s}"\nsecret = "s{s}"\nscope = "{s}"\n'
                   for s in ("all", "track", "app"))
    c = load_config(_config(tmp_path, keys), {})
    assert [k.scope for k in c.http.keys] == ["all", "track", "app"]


def test_an_unknown_scope_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    keys = ('[[http.keys]]\nname = "ok"\nsecret = "s1"\n'
            '[[http.keys]]\nname = "browser"\nsecret = "s2"\nscope = "write"\n')
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, keys), {})
    message = str(info.value)
    assert "http.keys[1].scope" in message
    assert "'browser'" in message
    assert "'write'" in message
    assert "track" in message


def test_a_scope_must_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_config(tmp_path, '[[http.keys]]\nname = "a"\nsecret = "s"\nscope = 1\n'),
                    {})
    assert "http.keys[0].scope" in str(info.value)
