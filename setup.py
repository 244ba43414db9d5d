"""The compiled hot path: Cython modules built with the package (the rest is in pyproject.toml).

Directives are set here once for every module. ``LSTM_CYTHON_CHECKS=1`` turns on bounds
and wraparound checks for debugging (slower; never for a release build).
"""

import os

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

CHECKS = os.environ.get("LSTM_CYTHON_CHECKS") == "1"
DIRECTIVES = {
    "language_level": 3,
    "boundscheck": CHECKS,
    "wraparound": CHECKS,
    "initializedcheck": CHECKS,
    "cdivision": True,
    "embedsignature": True,
}
MODULES = [
    "service/api/codec.pyx",  # StepRequest bytes in, StepResponse bytes out
    "service/core/scan.pyx",  # admission's pass over the events, a run's pick
    "service/counts.pyx",  # pending counts per row, histogram buckets
    "service/state/rows.pyx",  # a table's rows taken and written by slot
]

setup(
    ext_modules=cythonize(
        [
            Extension(
                path[:-4].replace("/", "."),
                [path],
                include_dirs=[numpy.get_include()],  # service/arrays.pxd reads array headers
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
            for path in MODULES
        ],
        compiler_directives=DIRECTIVES,
    )
)
