"""``python -m fastres``: the ``fastres`` command."""

import sys

from fastres.cli import main

sys.exit(main())
