"""deploy/: the production config example loads, and the unit has what systemd needs."""

from __future__ import annotations

import configparser
import re
import tomllib
from pathlib import Path

from segflowd.config import load_config
from segflowd.providers import ProviderContext, load_provider

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

SECRETS = {
    "SEGFLOW_DATABASE_URL": "mysql+aiomysql://segflow:pw@127.0.0.1:3306/segflow",
    "SEGFLOW_METRICS_KEY": "m", "SEGFLOW_API_KEY": "k", "SEGFLOW_EMAIL_SECRET": "e",
    "SEGFLOW_SMTP_PASSWORD": "p",
}


def test_production_config_loads_with_its_secrets_from_the_environment() -> None:
    c = load_config(DEPLOY / "segflow.production.toml", SECRETS)
    assert c.store.url.startswith("mysql+aiomysql://")
    assert c.email.provider == "smtp"
    assert c.providers["smtp"].options["password"] == "p"
    assert c.http.keys[0].secret == "k"
    assert c.daemon.control_socket == Path("/run/segflow/segflow.sock")
    smtp = load_provider(ProviderContext("smtp", c.providers["smtp"].options, c.base_dir))
    assert type(smtp).__name__ == "SmtpProvider"  # its options are all ones smtp knows


def test_unit_is_type_notify_with_watchdog_hardening_and_secrets_file() -> None:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    unit.read(DEPLOY / "segflowd.service")
    s = unit["Service"]
    assert s["Type"] == "notify"
    assert s["WatchdogSec"]
    assert s["DynamicUser"] == "yes"
    assert s["StateDirectory"] == "segflow"
    assert s["RuntimeDirectory"] == "segflow"
    assert s["EnvironmentFile"] == "/etc/segflow/secrets.env"
    assert "--config /etc/segflow/segflow.toml" in s["ExecStart"]
    assert s["RestartPreventExitStatus"] == "2"
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert s[key] == value
    assert set(s["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}


def _unit_service() -> configparser.SectionProxy:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    unit.read(DEPLOY / "segflowd.service")
    return unit["Service"]


def test_unit_has_no_reload_that_would_stop_the_service_for_good() -> None:
    """ExecReload=kill -TERM with Restart=on-failure made `systemctl reload` a stop."""
    s = _unit_service()
    assert "ExecReload" not in s
    assert s["Restart"] == "on-failure"
    assert "systemctl restart segflowd" in (DEPLOY / "segflowd.service").read_text()


def _credentials() -> dict[str, str]:
    """The unit's commented ``#LoadCredential=NAME:SOURCE`` examples, by NAME."""
    found = re.findall(r"^#LoadCredential=([\w-]+):(/\S+)$",
                       (DEPLOY / "segflowd.service").read_text(), flags=re.M)
    return dict(found)


def test_unit_shows_load_credential_for_every_secret_of_the_config(tmp_path: Path) -> None:
    """Each ``# or: KEY_file = "/run/credentials/segflowd.service/NAME"`` of the example
    config has its LoadCredential=NAME in the unit, and the config loads with the secrets
    read from those files instead of the environment."""
    creds = _credentials()
    assert set(creds) == {"database-url", "metrics-key", "api-key", "email-secret",
                          "smtp-password"}
    assert all(src.startswith("/etc/segflow/credentials/") for src in creds.values())
    text = (DEPLOY / "segflow.production.toml").read_text()
    alternatives = re.findall(
        r'^(\w+)_env = "(\w+)"[^\n]*\n# or: \1_file = "/run/credentials/segflowd\.service/'
        r'([\w-]+)"$', text, flags=re.M)
    assert {name for _, _, name in alternatives} == set(creds)
    # Swap every *_env line for its *_file form, with the credentials directory in tmp_path.
    for key, var, name in alternatives:
        text = text.replace(f'{key}_env = "{var}"', f'{key}_file = "{tmp_path / name}"', 1)
        (tmp_path / name).write_text(SECRETS[var] + "\n", encoding="utf-8")
    config = tmp_path / "segflow.toml"
    config.write_text(text, encoding="utf-8")
    c = load_config(config, {})
    assert c.store.url == SECRETS["SEGFLOW_DATABASE_URL"]
    assert c.http.metrics_key == "m"
    assert c.http.keys[0].secret == "k"
    assert c.email.secret == "e"
    assert c.providers["smtp"].options["password"] == "p"


def test_license_file_and_pep_639_metadata() -> None:
    """The MIT licence ships as LICENSE and pyproject.toml declares it by PEP 639 (an SPDX
    expression and license-files, which need setuptools 77 to build)."""
    root = DEPLOY.parent
    text = (root / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 Segflow contributors" in text
    meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    assert meta["project"]["license"] == "MIT"
    assert meta["project"]["license-files"] == ["LICENSE"]
    assert "setuptools>=77" in meta["build-system"]["requires"]
