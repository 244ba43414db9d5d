"""``python -m service``: the same as ``lstm-serve``."""

import sys

from service.server import main

sys.exit(main())
