"""rich progress bars for the long loops (training, sampling, evaluation): bar, n/total, the
loop's own fields (loss...), it/s, elapsed and ETA."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class SpeedColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("-- it/s" if speed is None else f"{speed:.2f} it/s" if speed >= 0.1 else f"{1 / speed:.1f} s/it")


def progress_bar(label: str, fields: tuple[str, ...] = (), console=None, disable: bool = False) -> Progress:
    """Progress(...) with `fields` shown as `name value`; add_task(..., **{name: value}) first."""
    columns = [TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{f} {{task.fields[{f}]:.4g}}") for f in fields]
    columns += [SpeedColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, disable=disable)
