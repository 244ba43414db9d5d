"""``lstm-serve``: starts the server once the compiled hot path is there, else says so in one line.

The hot path (``service/api/codec.pyx``, ``service/core/scan.pyx``,
``service/counts.pyx``) has no Python twin: an install that did not compile
it (a copied source tree, a failed build) is refused at start rather than run
half-built.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

COMPILED = ("service.api.codec", "service.core.scan", "service.counts", "service.state.rows")


def missing() -> list[str]:
    """The compiled modules that cannot be imported."""
    absent = []
    for name in COMPILED:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


def main(argv: Sequence[str] | None = None) -> int:
    absent = missing()
    if absent:
        print(
            f"lstm-serve: the compiled hot path is not built ({', '.join(absent)}): install "
            "with `pip install .` or `pip install -e .`, which compiles it (needs a C compiler)",
            file=sys.stderr,
        )
        return 1
    from service.server import main as serve

    return serve(argv)
