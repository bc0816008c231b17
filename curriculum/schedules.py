"""Step schedules over training iterations, e.g. max response length 8K -> 16K -> 32K
(SPEC.md section 3 curriculum stages; section 4 length growth)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def _entries(schedule: Sequence[Sequence[Any]] | Mapping[Any, Any]) -> list[tuple[int, Any]]:
    if isinstance(schedule, Mapping):
        pairs = list(schedule.items())
    else:
        pairs = []
        for entry in schedule:
            if len(entry) != 2:
                raise ValueError(f"schedule entry {list(entry)!r} is not [start_iteration, value]")
            pairs.append((entry[0], entry[1]))
    entries = sorted(((int(start), value) for start, value in pairs), key=lambda e: e[0])
    starts = [start for start, _ in entries]
    if len(set(starts)) != len(starts):
        raise ValueError(f"schedule has duplicate start iterations: {starts}")
    return entries


def piecewise(schedule: Sequence[Sequence[Any]] | Mapping[Any, Any], iteration: int) -> Any:
    """Value of the last entry whose start <= `iteration`.

    `schedule` is [[start_iteration, value], ...] or {start_iteration: value} (keys may be
    strings of ints, as from OmegaConf); entries are sorted by start here.
    """
    entries = _entries(schedule)
    if not entries:
        raise ValueError("piecewise schedule is empty: give at least one [start_iteration, value]")
    if iteration < entries[0][0]:
        raise ValueError(
            f"iteration {iteration} is before the schedule's first start {entries[0][0]}"
        )
    value = entries[0][1]
    for start, candidate in entries:
        if start > iteration:
            break
        value = candidate
    return value
