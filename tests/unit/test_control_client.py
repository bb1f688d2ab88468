from __future__ import annotations

import errno
from pathlib import Path

import pytest

from segflowd.control.client import _unreachable, resolve_socket
from segflowd.errors import ConfigError

P = Path("/run/segflow/segflow.sock")


@pytest.mark.parametrize(("exc", "sentence"), [
    (FileNotFoundError(errno.ENOENT, "No such file"),
     "no control socket at /run/segflow/segflow.sock: is segflowd running? "
     "(see [daemon] control_socket)"),
    (PermissionError(errno.EACCES, "Permission denied"),
     "permission denied on the control socket /run/segflow/segflow.sock: run as the "
     "daemon's user or as a member of [daemon] control_socket_group"),
    (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
     "segflowd is not running: nothing listens on the control socket "
     "/run/segflow/segflow.sock"),
    (OSError(errno.ENAMETOOLONG, "File name too long"),
     "cannot connect to the control socket /run/segflow/segflow.sock: File name too long"),
])
def test_each_connection_failure_is_one_sentence_to_act_on(exc: OSError, sentence: str) -> None:
    assert str(_unreachable(P, exc)) == sentence


def test_socket_path_comes_from_the_flag_or_the_config(tmp_path: Path) -> None:
    cfg = tmp_path / "segflow.toml"
    cfg.write_text('[daemon]\napp = "app.py:app"\ncontrol_socket = "run/ctl.sock"\n'
                   '[providers.outbox]\nplugin = "outbox"\n')
    assert resolve_socket("/x.sock", None) == Path("/x.sock")
    assert resolve_socket(None, str(cfg)) == tmp_path / "run" / "ctl.sock"
    with pytest.raises(ConfigError):
        resolve_socket(None, str(tmp_path / "missing.toml"))
