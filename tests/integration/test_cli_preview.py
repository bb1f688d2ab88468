"""``segflowd preview`` renders a template for a stored user into .html and .eml files."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

import anyio
import pytest
from delivery_harness import add_user, write_app, write_config

from segflowd.cli.commands import main
from segflowd.config import load_config
from segflowd.store import Store


def seed(tmp_path: Path) -> Path:
    write_app(tmp_path)
    cfg = write_config(tmp_path)
    config = load_config(cfg, environ={})

    async def go() -> None:
        store = Store.open(config.store.url)
        await store.migrate()
        await add_user(store, "u1", "ann@example.org", name="Ann <3")
        await store.close()

    anyio.run(go)
    return cfg


def test_preview_writes_html_and_eml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = seed(tmp_path)
    out = tmp_path / "preview"
    code = main(["preview", "welcome", "--user", "u1", "--data", '{"plan": "gold"}',
                 "--event", '{"name": "signup"}', "--config", str(cfg), "--out", str(out)])
    assert code == 0
    assert "subject: Welcome Ann <3!" in capsys.readouterr().out
    html = (out / "welcome.html").read_text()
    assert "Hello Ann &lt;3" in html
    assert "Your plan: gold" in html
    assert "style=" in html  # inlined
    msg = email.message_from_bytes((out / "welcome.eml").read_bytes(),
                                   policy=email.policy.default)
    assert msg["To"] == "ann@example.org"
    assert msg.get_content_type() == "multipart/alternative"
    assert msg["List-Unsubscribe"].startswith("<https://mail.example.com/u/")


def test_preview_reports_mistakes_without_a_traceback(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = seed(tmp_path)
    assert main(["preview", "nope", "--user", "u1", "--config", str(cfg)]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err
    assert main(["preview", "welcome", "--user", "ghost", "--config", str(cfg)]) == 1
    assert "no user 'ghost'" in capsys.readouterr().err
    assert main(["preview", "welcome", "--user", "u1", "--config", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "'plan' is undefined" in err
    assert "Traceback" not in err
    assert main(["preview", "welcome", "--user", "u1", "--data", "[1]",
                 "--config", str(cfg)]) == 2
    assert "--data must be a JSON object" in capsys.readouterr().err
