"""``python -m segflowd.cli``: the same as the ``segflowd`` command."""

from __future__ import annotations

import sys

from .commands import main

sys.exit(main())
