"""Progress of long work: rich progress bars on a terminal, one plain line per step elsewhere.

Logs and batch jobs (stdout not a terminal) get a line each time a bar's description changes (each
epoch, each checkpoint) and when it finishes: what it is doing, how far, time so far and ETA, instead
of the control characters a bar leaves in a file.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import Progress


def _seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


class PlainProgress:
    """The part of rich's `Progress` the toolkit uses, printing plain lines."""

    def __init__(self, disable: bool = False, console: Console | None = None) -> None:
        self.disable = disable
        self.console = console
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for task_id, task in self.tasks.items():
            finished = bool(task["total"]) and task["completed"] >= task["total"]
            worked = task["completed"] > task["start"]
            # A closing line for work that said nothing yet (image encoding) or just reached its total.
            if exc_info[0] is None and worked and not task["announced_done"] and (finished or not task["lines"]):
                self._line(task_id, done=True)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        task_id = len(self.tasks)
        self.tasks[task_id] = {
            "description": description,
            "total": total,
            "completed": completed,
            "start": completed,
            "started": time.perf_counter(),
            "announced_done": False,
            "lines": 0,
        }
        return task_id

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        description: str | None = None,
        total: float | None = None,
        **_: Any,
    ) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task["total"] = total
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        if description is not None and description != task["description"]:
            task["description"] = description
            self._line(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _line(self, task_id: int, done: bool = False) -> None:
        if self.disable:
            return
        task = self.tasks[task_id]
        elapsed = time.perf_counter() - task["started"]
        completed, total = task["completed"], task["total"]
        parts = [f"{completed:g}/{total:g}" if total else f"{completed:g}", f"{_seconds(elapsed)} elapsed"]
        finished = completed - task["start"]
        if total and finished > 0 and completed < total:
            parts.append(f"ETA {_seconds(elapsed / finished * (total - completed))}")
        task["announced_done"] = bool(total) and completed >= total
        task["lines"] += 1
        line = f"{task['description']}{' done' if done else ''}: {', '.join(parts)}"
        if self.console is not None:
            self.console.print(line, soft_wrap=True, highlight=False, markup=False)
        else:
            print(line, flush=True)


def progress_bar(
    *columns: Any, disable: bool = False, transient: bool = False, console: Console | None = None
) -> Progress | PlainProgress:
    """A rich `Progress` with `columns` when output goes to a terminal, else a `PlainProgress`."""
    terminal = console.is_terminal if console is not None else sys.stdout.isatty()
    if terminal:
        return Progress(*columns, disable=disable, transient=transient, console=console)
    return PlainProgress(disable=disable, console=console)
