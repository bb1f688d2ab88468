"""``segflowd check`` says what ``[http] public_url`` costs the mail sent."""

from __future__ import annotations

from pathlib import Path

from segflowd.cli.check import public_url_warnings
from segflowd.config import load_config

BASE = '[daemon]\napp = "app.py:app"\n[http]\nlisten = "127.0.0.1:8787"\n'


def warnings_for(tmp_path: Path, http: str) -> list[str]:
    path = tmp_path / "segflow.toml"
    path.write_text(BASE + http, encoding="utf-8")
    return public_url_warnings(load_config(path, {}))


def test_an_http_public_url_is_warned_to_lose_one_click_unsubscribe(tmp_path: Path) -> None:
    [line] = warnings_for(tmp_path, 'public_url = "http://mail.example.com"\n')
    assert line.startswith("warning: http.public_url 'http://mail.example.com' is not https")
    assert "List-Unsubscribe-Post" in line


def test_no_public_url_is_warned_to_point_at_the_listen_address(tmp_path: Path) -> None:
    [line] = warnings_for(tmp_path, "")
    assert "http://127.0.0.1:8787" in line


def test_an_https_public_url_is_fine(tmp_path: Path) -> None:
    assert warnings_for(tmp_path, 'public_url = "https://mail.example.com"\n') == []
