"""The OpenMP wait policy the command line and the benchmarks run torch with (imports nothing heavy)."""

from __future__ import annotations

import os

#: libgomp spin iterations before a waiting thread sleeps.
SPIN_COUNT = "10000"


def bound_openmp_spin() -> None:
    """Make OpenMP threads spin only briefly before sleeping; call before torch is imported.

    OpenMP threads that busy-wait for long between ops starve the loader's threads on small, shared CPUs
    (libgomp's default spin), while never spinning (``OMP_WAIT_POLICY=PASSIVE``) pays a thread wake-up on every
    small op. A short bounded spin keeps both (the measurements: bench/README.md, "Figures behind design
    choices"). An explicit ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` in the environment wins.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", SPIN_COUNT)
