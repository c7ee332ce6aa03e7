"""``relay bench``: what one relay process carries per core. See :mod:`relay.bench.run`.

Kept import-free so the load processes (spawned, they import this package
first) start fast.
"""

from __future__ import annotations

from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    from relay.bench.run import main as run_main

    return run_main(list(argv) if argv is not None else None)
