"""rich progress bars for the long loops (training, sampling, evaluation): label, bar, n/total,
the loop's own fields (loss...), rate, elapsed and ETA."""

from __future__ import annotations

import math

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text


class SpeedColumn(ProgressColumn):
    def __init__(self, unit: str = "it"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text(f"-- {self.unit}/s")
        return Text(f"{speed:.2f} {self.unit}/s" if speed >= 0.1 else f"{1 / speed:.1f} s/{self.unit}")


class FieldColumn(ProgressColumn):
    """`name value` of a task field; `name --` while the loop has no value yet (None or nan)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def render(self, task) -> Text:
        value = task.fields.get(self.name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return Text(f"{self.name} --")
        return Text(f"{self.name} {value:.4g}")


def capped_eta(by_rate: float | None, deadline: float | None, now: float) -> tuple[float | None, bool]:
    """(seconds left, whether the deadline decides): the rate's estimate, unless a deadline
    (same clock as `now`) comes first. None: unknown (no rate yet and no deadline)."""
    if deadline is None or not math.isfinite(deadline):
        return by_rate, False
    left = max(0.0, deadline - now)
    if by_rate is None or left < by_rate:
        return left, True
    return by_rate, False


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class EtaColumn(ProgressColumn):
    """`ETA h:mm:ss` from the rate; a task field `deadline` (the loop's stop time, on the
    progress clock: time.monotonic) caps it, marked `(time cap)`."""

    max_refresh = 0.5

    def render(self, task) -> Text:
        if task.finished:
            return Text("ETA 0:00:00")
        eta, capped = capped_eta(task.time_remaining, task.fields.get("deadline"), task.get_time())
        if eta is None:
            return Text("ETA -:--:--")
        return Text(f"ETA {_clock(eta)}" + (" (time cap)" if capped else ""))


def progress_bar(label: str | None, fields: tuple[str, ...] = (), console=None, disable: bool = False,
                 unit: str = "it") -> Progress:
    """Progress(...) with `fields` shown as `name value` (add_task(..., name=value); None shows
    `name --`). label None: each bar is labelled with its task's description."""
    columns = [TextColumn(f"[bold]{label}" if label is not None else "[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn()]
    columns += [FieldColumn(f) for f in fields]
    columns += [SpeedColumn(unit), TimeElapsedColumn(), EtaColumn()]
    return Progress(*columns, console=console, disable=disable)
