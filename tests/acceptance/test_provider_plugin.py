"""A third-party provider, built and installed as its own package, is used by name."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent

DIST = "segflow_provider_jsonl-1.0.0"
METADATA = "Metadata-Version: 2.1\nName: segflow-provider-jsonl\nVersion: 1.0.0\n"
WHEEL = "Wheel-Version: 1.0\nGenerator: segflow-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
ENTRY_POINTS = "[segflow.providers]\njsonl = segflow_jsonl:JsonlProvider\n"


def build_wheel(out: Path, module: str) -> Path:
    """A minimal, valid wheel of the provider package (no build backend needed offline)."""
    files = {"segflow_jsonl.py": module, f"{DIST}.dist-info/METADATA": METADATA,
             f"{DIST}.dist-info/WHEEL": WHEEL,
             f"{DIST}.dist-info/entry_points.txt": ENTRY_POINTS}
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{DIST}.dist-info/RECORD,,")
    files[f"{DIST}.dist-info/RECORD"] = "\n".join(record) + "\n"
    path = out / f"{DIST}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


MODULE = '''\
"""Appends each message to a JSON-lines file: a third-party Segflow provider."""
import json
from pathlib import Path

from segflowd.providers import SendResult


class JsonlProvider:
    max_batch = 10

    def __init__(self, ctx):
        self.path = Path(str(ctx.options["file"]))

    async def send(self, messages):
        with self.path.open("a") as fh:
            for m in messages:
                fh.write(json.dumps({"id": m.id, "to": m.to, "subject": m.subject}) + "\\n")
        return [SendResult(ok=True, provider_message_id=f"jsonl-{m.id}") for m in messages]

    async def aclose(self):
        return None
'''

SCRIPT = """\
import sys
import anyio
import sqlalchemy as sa
from pathlib import Path

sys.path.insert(0, {harness!r})
from delivery_harness import add_user, make_kernel, message_row
from segflowd.delivery.service import DeliveryService
from segflowd.delivery.outbox import enqueue
from segflowd.providers import available_providers
from segflowd.store import Store

async def main():
    base = Path({base!r})
    store = Store.open(f"sqlite+aiosqlite:///{{base}}/segflow.db")
    await store.migrate()
    setup = make_kernel(store, base, provider="custom",
                        options='plugin = "jsonl"\\nfile = "' + str(base / "out.jsonl") + '"\\n')
    await add_user(store, "u1", "ann@example.org", name="Ann")
    async with store.begin() as conn:
        mid = await enqueue(conn, kind="transaction", template="receipt", now=setup.clock.now(),
                            user_id="u1", dedupe_key=None, data={{"amount": "$3"}})
    svc = DeliveryService(setup.kernel)
    await svc.run_once()
    row = await message_row(store, mid)
    print("PROVIDERS", ",".join(available_providers()))
    print("RESULT", row["status"], row["provider"], row["provider_message_id"])
    await store.close()

anyio.run(main)
"""


def test_third_party_provider_package_is_installed_and_used_by_name(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, MODULE)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=120)
    work = tmp_path / "work"
    work.mkdir()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(SCRIPT.format(harness=str(HERE.parent / "integration"),
                                                    base=str(work))))
    env = {**os.environ, "PYTHONPATH": str(site)}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines()
                 if line.startswith(("PROVIDERS", "RESULT")))
    assert "jsonl" in lines["PROVIDERS"].split(",")
    assert lines["RESULT"].split() == ["sent", "custom", "jsonl-1"]
    [record] = [json.loads(x) for x in (work / "out.jsonl").read_text().splitlines()]
    assert record == {"id": 1, "to": "ann@example.org", "subject": "Your receipt"}
