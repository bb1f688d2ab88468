"""Secrets outside segflow.toml: ``k_file`` beside ``k_env``, and environment overrides
whose errors name the variable that carried the bad value, not the config file."""

from __future__ import annotations

from pathlib import Path

import pytest

from segflow_plugins._options import Options
from segflowd.config import load_config
from segflowd.errors import ConfigError, ProviderError
from segflowd.providers import ProviderContext

MINIMAL = """\
[daemon]
app = "app.py:app"

[providers.outbox]
plugin = "outbox"
"""
SECRET = "s3cr3t-never-shown"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "segflow.toml"
    path.write_text(MINIMAL + text, encoding="utf-8")
    return path


def error_of(path: Path, environ: dict[str, str] | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ or {})
    return info.value


def test_a_file_key_reads_the_file_less_one_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "email-secret").write_text(SECRET + "\n\n", encoding="utf-8")
    c = load_config(write(tmp_path, "[email]\nsecret_file = 'email-secret'\n"), {})
    assert c.email.secret == SECRET + "\n"  # one newline only: the rest is the secret's


def test_a_crlf_line_end_is_one_newline_too(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(SECRET.encode() + b"\r\n")
    c = load_config(write(tmp_path, "[email]\nsecret_file = 'k'\n"), {})
    assert c.email.secret == SECRET


def test_file_keys_work_in_every_table_kind(tmp_path: Path) -> None:
    """Section keys, array-of-table entries and named provider / source tables alike, with
    absolute paths (a systemd credential: /run/credentials/segflowd.service/NAME)."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    for name, value in (("api", "key-1"), ("smtp", "pw"), ("crm", "postgresql://x/y")):
        (creds / name).write_text(value + "\n", encoding="utf-8")
    path = write(tmp_path, f"""
[[http.keys]]
name = "ingest"
secret_file = "{creds / 'api'}"

[providers.mail]
plugin = "smtp"
host = "localhost"
password_file = "{creds / 'smtp'}"

[sources.crm]
url_file = "{creds / 'crm'}"
""")
    c = load_config(path, {})
    assert c.http.keys[0].secret == "key-1"
    assert c.providers["mail"].options["password"] == "pw"
    assert "password_file" not in c.providers["mail"].options
    assert c.sources["crm"].get_str("url") == "postgresql://x/y"


@pytest.mark.parametrize(("keys", "named", "says"), [
    ("secret = 'a'\nsecret_file = 'f'", "email.secret_file",
     "give either secret or secret_file, not both"),
    ("secret_env = 'A'\nsecret_file = 'f'", "email.secret_file",
     "give either secret_env or secret_file, not both"),
    ("secret = 'a'\nsecret_env = 'A'\nsecret_file = 'f'", "email.secret_env",
     "give only one of secret, secret_env, secret_file"),
])
def test_two_spellings_of_one_key_are_refused_naming_the_key(
        tmp_path: Path, keys: str, named: str, says: str) -> None:
    (tmp_path / "f").write_text("x", encoding="utf-8")
    path = write(tmp_path, f"[email]\n{keys}\n")
    err = error_of(path, {"A": "x"})
    assert err.key == named
    assert says in str(err)
    assert err.file == str(path)


def test_a_missing_secret_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    path = write(tmp_path, "[providers.mail]\nplugin = 'smtp'\npassword_file = 'nope/pw'\n")
    err = error_of(path)
    assert err.key == "providers.mail.password_file"
    assert err.file == str(path)
    assert err.line == 8  # [providers.mail] is line 6
    assert f"cannot read {tmp_path / 'nope' / 'pw'}: No such file or directory" in str(err)


@pytest.mark.parametrize(("content", "says"), [
    (b"\xff\xfe" + SECRET.encode(), "is not UTF-8 text"),
    (SECRET.encode() * 5000, "is longer than 65536 bytes"),
], ids=["not-utf-8", "too-long"])
def test_a_bad_secret_file_is_refused_without_showing_its_content(
        tmp_path: Path, content: bytes, says: str) -> None:
    (tmp_path / "secret").write_bytes(content)
    err = error_of(write(tmp_path, "[email]\nsecret_file = 'secret'\n"))
    assert err.key == "email.secret_file"
    assert says in str(err)
    assert str(tmp_path / "secret") in str(err)
    assert SECRET not in str(err)


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "[email]\nsecret_file = '.'\n"))
    assert err.key == "email.secret_file"
    assert "Is a directory" in str(err)


def test_an_empty_file_path_is_refused(tmp_path: Path) -> None:
    err = error_of(write(tmp_path, "[email]\nsecret_file = ''\n"))
    assert err.key == "email.secret_file"
    assert "must name a file" in str(err)


def test_file_overrides_from_the_environment(tmp_path: Path) -> None:
    """SEGFLOW_EMAIL_SECRET_FILE and SEGFLOW_PROVIDERS_<NAME>_<KEY>_FILE replace every
    spelling of the key in the file; a relative path is relative to the config file."""
    (tmp_path / "email").write_text("from-file\n", encoding="utf-8")
    (tmp_path / "pw").write_text("pw-from-file\n", encoding="utf-8")
    path = write(tmp_path, "[email]\nsecret = 'in-toml'\n[providers.mail]\nplugin = 'smtp'\n"
                           "password = 'in-toml'\n")
    c = load_config(path, {"SEGFLOW_EMAIL_SECRET_FILE": "email",
                           "SEGFLOW_PROVIDERS_MAIL_PASSWORD_FILE": str(tmp_path / "pw")})
    assert c.email.secret == "from-file"
    assert c.providers["mail"].options["password"] == "pw-from-file"


@pytest.mark.parametrize(("environ", "var", "key", "says"), [
    ({"SEGFLOW_STORE_POOL_SIZE": "many"}, "SEGFLOW_STORE_POOL_SIZE", "store.pool_size",
     "must be an integer"),
    ({"SEGFLOW_DAEMON_LOG_LEVEL": "loud"}, "SEGFLOW_DAEMON_LOG_LEVEL", "daemon.log_level",
     "must be one of"),
    ({"SEGFLOW_EMAIL_SECRET_ENV": "UNSET"}, "SEGFLOW_EMAIL_SECRET_ENV", "email.secret_env",
     "environment variable UNSET is not set"),
    ({"SEGFLOW_EMAIL_SECRET_FILE": "/nonexistent/s"}, "SEGFLOW_EMAIL_SECRET_FILE",
     "email.secret_file", "cannot read /nonexistent/s"),
    ({"SEGFLOW_PROVIDERS_OUTBOX_PLUGIN": ""}, "SEGFLOW_PROVIDERS_OUTBOX_PLUGIN",
     "providers.outbox.plugin", "must name an entry point"),
])
def test_an_environment_override_error_names_the_variable_not_the_file(
        tmp_path: Path, environ: dict[str, str], var: str, key: str, says: str) -> None:
    path = write(tmp_path, "[store]\npool_size = 4\n")
    err = error_of(path, environ)
    assert err.key == key
    assert str(err).startswith(f"environment variable {var}: {key}: ")
    assert says in str(err)
    assert str(path) not in str(err)
    assert err.line is None


def test_a_file_error_still_names_the_file_when_other_keys_are_overridden(
        tmp_path: Path) -> None:
    path = write(tmp_path, "[store]\npool_size = 0\n")
    err = error_of(path, {"SEGFLOW_DAEMON_LOG_LEVEL": "debug"})
    assert err.key == "store.pool_size"
    assert err.file == str(path)
    assert "environment variable" not in str(err)


def test_a_missing_required_provider_option_names_all_three_spellings(tmp_path: Path) -> None:
    o = Options(ProviderContext("pm", {}, tmp_path), "postmark", ("server_token",))
    with pytest.raises(ProviderError, match=r"\[providers\.pm\]\.server_token: required "
                                            r"\(give server_token, server_token_env or "
                                            r"server_token_file\)"):
        o.text("server_token", required=True)
