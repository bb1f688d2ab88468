"""``python -m segflowd.cli``: the same as the ``segflowd`` command."""

from __future__ import annotations

import sys

from . import main  # not commands.main: this one ends a broken pipe quietly

sys.exit(main())
