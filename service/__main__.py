"""``python -m service``: the same as ``lstm-serve``."""

import sys

from service.launch import main

sys.exit(main())
