"""``python -m model_export``: the same as ``lstm-export``."""

import sys

from model_export.cli import main

sys.exit(main())
