"""Display helpers for reports: the class order a person expects ("2" before "10").

Display only: the contract's indices stay plain-string sorted ("0" < "00" < "1" < "10" < "2"),
figures and tables list classes in natural order instead.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_RUNS = re.compile(r"(\d+)")


def natural_key(label: str) -> tuple[tuple[int, int, int, str], ...]:
    """Sort key: digit runs compare as numbers, then by length ("0" < "00" < "1" < "2" < "10"),
    other runs as text; numbers sort before text."""
    key = []
    for run in _RUNS.split(label):
        if not run:
            continue
        if run.isdigit():
            key.append((0, int(run), len(run), ""))
        else:
            key.append((1, 0, 0, run))
    return tuple(key)


def natural_order(labels: Sequence[str]) -> list[int]:
    """Positions of ``labels`` in natural order: ``[labels[i] for i in natural_order(labels)]``
    is the display order."""
    return sorted(range(len(labels)), key=lambda i: (natural_key(labels[i]), labels[i]))
