"""segflow.toml: typed values, environment overrides, and errors that name file, key, line."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflowd.config import DEFAULT_LISTEN, default_config_path, load_config
from segflowd.errors import ConfigError

MINIMAL = """\
[daemon]
app = "app.py:app"

[providers.outbox]
plugin = "outbox"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value


def test_minimal_config_gets_documented_defaults(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, MINIMAL), {})
    assert c.http.listen == DEFAULT_LISTEN
    assert c.daemon.drain_timeout == 10.0
    assert c.email.provider == "outbox"
    assert c.providers["outbox"].options == {"plugin": "outbox"}
    assert c.store.url == f"sqlite+aiosqlite:///{tmp_path / 'var' / 'segflow.db'}"


def test_default_outbox_provider_needs_no_providers_table(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, '[daemon]\napp = "app.py:app"\n'), {})
    assert c.email.provider == "outbox"
    assert c.providers["outbox"].options == {"plugin": "outbox"}
    # a provider other than the default still needs its table
    err = error_of(write(tmp_path, '[daemon]\napp = "app.py:app"\n[email]\n'
                                   'provider = "postmark"\n'))
    assert err.key == "email.provider"


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    err = error_of(tmp_path / "absent.toml")
    assert err.file == str(tmp_path / "absent.toml")
    assert "not found" in str(err)
    assert str(tmp_path / "absent.toml") in str(err)


def test_toml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[http]\nlisten = 127.0.0.1:80\n")
    err = error_of(path)
    assert err.line == 8
    assert str(err).startswith(f"{path}:8: TOML syntax error")


def test_unknown_key_names_key_line_and_known_keys(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[http]\nlisten = '127.0.0.1:1'\nlistne = 'x'\n")
    err = error_of(path)
    assert err.key == "http.listne"
    assert err.line == 9
    assert "unknown key" in str(err)
    assert "listen" in err.reason


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, MINIMAL + "\n[deamon]\nx = 1\n"))
    assert err.key == "deamon"
    assert "unknown section [deamon]" in str(err)
    assert err.line == 7


def test_wrong_type_names_key_and_expected_type(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('app.py:app"', 'app.py:app"\ndrain_timeout = "soon"'))
    err = error_of(path)
    assert err.key == "daemon.drain_timeout"
    assert err.line == 3
    assert "must be a number, not a string" in str(err)


def test_missing_required_key(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "[providers.outbox]\nplugin = 'outbox'\n"))
    assert err.key == "daemon.app"
    assert "required key is missing" in str(err)


def test_missing_secret_env_variable_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[[http.keys]]\nname = 'k'\nsecret_env = 'MY_KEY'\n")
    err = error_of(path)
    assert err.key == "http.keys[0].secret_env"
    assert "environment variable MY_KEY is not set" in str(err)


def test_secret_env_indirection_reads_the_variable(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[[http.keys]]\nname = 'k'\nsecret_env = 'MY_KEY'\n"
                 "\n[sources.crm]\nurl_env = 'CRM_URL'\n")
    c = load_config(path, {"MY_KEY": "s3cret", "CRM_URL": "postgresql+asyncpg://crm/db"})
    assert c.http.keys[0].secret == "s3cret"
    assert "s3cret" not in repr(c.http.keys[0])  # secrets stay out of logs
    assert c.sources["crm"].get_str("url") == "postgresql+asyncpg://crm/db"


def test_both_key_and_key_env_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "\n[sources.crm]\nurl = 'a'\nurl_env = 'B'\n")
    err = error_of(path, {"B": "b"})
    assert "give either url or url_env, not both" in str(err)


def test_env_overrides_section_keys_with_type_coercion(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, MINIMAL), {
        "SEGFLOW_HTTP_LISTEN": "127.0.0.1:9999",
        "SEGFLOW_DAEMON_DRAIN_TIMEOUT": "2.5",
        "SEGFLOW_STORE_POOL_SIZE": "3",
        "SEGFLOW_EMAIL_TRACK": "yes",
        "SEGFLOW_EMAIL_FROM": "Ops <ops@example.com>",
    })
    assert c.http.port == 9999
    assert c.daemon.drain_timeout == 2.5
    assert c.store.pool_size == 3
    assert c.email.track is True
    assert c.email.from_ == "Ops <ops@example.com>"


def test_env_override_of_a_key_env_spelling(tmp_path: Path) -> None:
    """SEGFLOW_EMAIL_SECRET_ENV names the variable, replacing the file's secret."""
    path = write(tmp_path, MINIMAL + "\n[email]\nsecret = 'from-file'\n")
    c = load_config(path, {"SEGFLOW_EMAIL_SECRET_ENV": "TOKENS", "TOKENS": "from-env"})
    assert c.email.secret == "from-env"


def test_env_override_of_named_table_keys(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    c = load_config(path, {"SEGFLOW_PROVIDERS_OUTBOX_PATH": "/srv/outbox"})
    assert c.providers["outbox"].options["path"] == "/srv/outbox"


def test_bad_env_override_value_names_the_key(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, MINIMAL), {"SEGFLOW_STORE_POOL_SIZE": "many"})
    assert err.key == "store.pool_size"
    assert "must be an integer" in str(err)


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace('app.py:app"', 'app.py:app"\ncontrol_socket = '
                                           '"run/s.sock"') + "\n[store]\nurl = "
                 "'sqlite+aiosqlite:///data/x.db'\n")
    c = load_config(path, {})
    assert c.daemon.control_socket == tmp_path / "run" / "s.sock"
    assert c.store.url == f"sqlite+aiosqlite:///{tmp_path / 'data' / 'x.db'}"
    assert c.resolve("var/outbox") == tmp_path / "var" / "outbox"
    assert c.resolve("/abs") == Path("/abs")


def test_memory_sqlite_and_mysql_urls_are_left_alone(tmp_path: Path) -> None:
    for url in ("sqlite+aiosqlite:///:memory:", "mysql+aiomysql://u:p@db:3306/segflow"):
        c = load_config(write(tmp_path, MINIMAL + f"\n[store]\nurl = '{url}'\n"), {})
        assert c.store.url == url


@pytest.mark.parametrize(("snippet", "key", "message"), [
    ("[store]\nurl = 'postgresql://x'", "store.url", "must start with"),
    ("[http]\nlisten = 'localhost'", "http.listen", "must be HOST:PORT"),
    ("[http]\nlisten = '127.0.0.1:70000'", "http.listen", "must be HOST:PORT"),
    ("[email]\nprovider = 'smtp'", "email.provider", "names no [providers.smtp] table"),
    ("[daemon.x]\ny = 1", "daemon.x", "unknown key"),
    ("[[http.keys]]\nname = 'a'\nsecret = 'x'\n[[http.keys]]\nname = 'a'\nsecret = 'y'",
     "http.keys[1].name", "duplicate key name"),
    ("[sources.crm]\nschema = 'public'", "sources.crm.url", "give url or url_env"),
])
def test_invalid_values_are_reported_with_their_key(tmp_path: Path, snippet: str, key: str,
                                                    message: str) -> None:
    text = MINIMAL + "\n" + snippet + "\n"
    if snippet.startswith("[daemon.x]"):
        text = MINIMAL.replace("[daemon]", "[daemon]\nx = { y = 1 }")
    err = error_of(write(tmp_path, text))
    assert err.key == key
    assert message in str(err)


def test_log_level_choice_is_checked(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, MINIMAL), {"SEGFLOW_DAEMON_LOG_LEVEL": "loud"})
    assert err.key == "daemon.log_level"
    assert "debug, info, warning, error" in str(err)


def test_default_path_is_explicit_then_env_then_cwd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SEGFLOW_CONFIG", raising=False)
    assert default_config_path() == Path("segflow.toml")
    monkeypatch.setenv("SEGFLOW_CONFIG", "/etc/segflow/segflow.toml")
    assert default_config_path() == Path("/etc/segflow/segflow.toml")
    assert default_config_path("other.toml") == Path("other.toml")


def test_repository_segflow_toml_loads_as_is() -> None:
    root = Path(__file__).resolve().parents[2]
    c = load_config(root / "segflow.toml", {})
    assert c.daemon.app == "examples/saas/flows.py:app"
    assert c.store.url.startswith(f"sqlite+aiosqlite:///{root}/var/")
    assert c.email.provider == "outbox"


SENDING = """
[daemon]
app = "app.py:app"
[email]
provider = "mail"
[providers.mail]
plugin = "smtp"
host = "smtp.example.com"
"""


def test_a_real_provider_needs_a_public_url(tmp_path: Path) -> None:
    """Unsubscribe and tracking links must not point at the listen address when mail
    leaves the machine; the outbox (files on disk) may go without."""
    err = error_of(write(tmp_path, SENDING))
    assert err.key == "http.public_url"
    assert "[providers.mail] (smtp)" in str(err)
    c = load_config(write(tmp_path, SENDING + '[http]\npublic_url = "https://m.example.com"\n'),
                    {})
    assert c.http.public_url == "https://m.example.com"
    assert load_config(write(tmp_path, MINIMAL), {}).http.public_url == ""
