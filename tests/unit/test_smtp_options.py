"""The SMTP provider's safety options fail closed (issue #25, items 12 and 13)."""

from __future__ import annotations

from pathlib import Path

import pytest
from structlog.testing import capture_logs

from segflow_plugins.smtp import SmtpProvider
from segflowd.errors import ProviderError
from segflowd.providers import ProviderContext


def smtp(tmp_path: Path, **options: object) -> SmtpProvider:
    return SmtpProvider(ProviderContext("mail", {"host": "smtp.example.com", **options},
                                        tmp_path))


@pytest.mark.parametrize("value", ["on", "True ", "yes", "false", "0", 1])
def test_validate_certs_takes_only_a_toml_boolean(tmp_path: Path, value: object) -> None:
    """A string was read as a guess: anything but "1", "true", "yes" turned verification
    off, so a typo made TLS accept any certificate."""
    with pytest.raises(ProviderError, match=r"\[providers\.mail\]\.validate_certs: must be "
                                            r"true or false"):
        smtp(tmp_path, validate_certs=value)


@pytest.mark.parametrize("value", [True, False])
def test_validate_certs_as_a_boolean_is_kept(tmp_path: Path, value: bool) -> None:
    assert smtp(tmp_path, validate_certs=value).validate_certs is value
    assert smtp(tmp_path).validate_certs is True


def test_a_username_without_encryption_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match=r"cleartext.*allow_plaintext_auth = true"):
        smtp(tmp_path, security="none", username="mailer", password="secret-pw")


def test_plaintext_auth_when_asked_for_is_allowed_and_warned_about(tmp_path: Path) -> None:
    with capture_logs() as logs:
        provider = smtp(tmp_path, security="none", username="mailer", password="secret-pw",
                        allow_plaintext_auth=True)
    assert provider.username == "mailer"
    warned = [e for e in logs if e["event"] == "smtp.plaintext_auth"]
    assert [(e["log_level"], e["host"]) for e in warned] == [("warning", "smtp.example.com")]
    assert "secret-pw" not in repr(logs)


def test_no_username_without_encryption_needs_no_permission(tmp_path: Path) -> None:
    with capture_logs() as logs:
        smtp(tmp_path, security="none")
    assert not [e for e in logs if e["event"] == "smtp.plaintext_auth"]
