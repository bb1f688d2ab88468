"""deploy/: the production config example loads, and the unit has what systemd needs."""

from __future__ import annotations

import configparser
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
