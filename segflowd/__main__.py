"""``python -m segflowd``: the same as the ``segflowd`` command."""

from __future__ import annotations

import sys

from .cli import main

sys.exit(main())
