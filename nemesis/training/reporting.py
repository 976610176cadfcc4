"""Live logs of a run (`--report-to tensorboard,wandb`): every metrics.jsonl row sent to the chosen backends.

A `Reporter` takes the rows the journal writes (`log(row)`) and is closed at the end (`close()`);
one class per backend, and `open_reporter` builds the ones a config names, so the trainer never
branches on backends. Reporting is a runtime option: it reads rows, never the model, and leaves
the global random generators as it found them, so it cannot change what a run learns.

Tags are `<kind>/<key>`, a list one scalar per position (`step/norms/0`, `step/alpha/3`); `kind`
and `step` are not values. The x axis is the training step: a step row's own `step`, and for a row
without one (the epoch row, written after its epoch's steps) the last step logged before it, so an
epoch's test accuracy and norms sit at the epoch's last step.

Light to import (no torch, no backend package): the config checks names with it before a run starts.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from ..errors import NemesisError

TENSORBOARD, WANDB = "tensorboard", "wandb"
REPORTERS = (TENSORBOARD, WANDB)  # the backends `--report-to` names, in the order they are written
NO_REPORTING = "none"
TENSORBOARD_FOLDER = "tensorboard"  # events of a run: <run>/tensorboard/
WANDB_FOLDER = "wandb"  # wandb writes its offline runs to <dir>/wandb/: dir is the run folder
NOT_VALUES = ("kind", "step")  # a row's keys that say what and when, not what was measured

# What each backend imports, and the extra of this package that installs it.
_NEEDS = {TENSORBOARD: ("tensorboard", "torch.utils.tensorboard"), WANDB: ("wandb",)}


def reporter_names(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """`"tensorboard,wandb"` (as the command line and config.json write it, or a list of names from Python)
    as known backend names, each once, in the order given; `none`, an empty text and None report nowhere."""
    parts = value.split(",") if isinstance(value, str) else list(value or ())
    names: list[str] = []
    for part in parts:
        name = str(part).strip().lower()
        if name in ("", NO_REPORTING):
            continue
        if name not in REPORTERS:
            raise NemesisError(f"unknown --report-to backend '{part}'; choose {', '.join(REPORTERS)} or none")
        if name not in names:
            names.append(name)
    return tuple(names)


def check_reporters(names: Sequence[str]) -> None:
    """Refuse, before any work, a backend whose package is not installed (each is an optional extra)."""
    for name in names:
        for module in _NEEDS[name]:
            try:
                importlib.import_module(module)
            except ImportError:
                raise NemesisError(
                    f"--report-to {name} needs the {name} package, which is not installed; "
                    f"pip install 'nemesis-prompts[{name}]' (or pip install {name})"
                ) from None


def row_scalars(row: dict[str, Any]) -> dict[str, float]:
    """The row's numbers by tag: `<kind>/<key>`, and `<kind>/<key>/<i>` for each entry of a list.

    None (no test accuracy this epoch, or a non-finite value the journal wrote as null), text and
    flags are not scalars and are left out."""
    kind = row.get("kind", "row")
    scalars = {}
    for key, value in row.items():
        if key in NOT_VALUES:
            continue
        if isinstance(value, list | tuple):
            for index, entry in enumerate(value):
                if _is_number(entry):
                    scalars[f"{kind}/{key}/{index}"] = float(entry)
        elif _is_number(value):
            scalars[f"{kind}/{key}"] = float(value)
    return scalars


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class Reporter(Protocol):
    """Where a run's rows go besides metrics.jsonl."""

    def log(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class _StepClock:
    """The x axis: a step row's step, else the last step seen (see the module's docstring)."""

    def __init__(self, last_step: int) -> None:
        self.last_step = last_step

    def step_of(self, row: dict[str, Any]) -> int:
        if isinstance(row.get("step"), int):
            self.last_step = row["step"]
        return self.last_step


class TensorBoardReporter:
    """Event files under `<run>/tensorboard/`, one scalar series per tag."""

    def __init__(self, run_folder: Path, resumed_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run's events from after its saved state (an epoch a kill cut short was
        # already logged) are dropped by TensorBoard's reader, so replayed steps are not shown twice.
        self.writer = SummaryWriter(log_dir=str(run_folder / TENSORBOARD_FOLDER), purge_step=resumed_step + 1)
        self.clock = _StepClock(resumed_step)

    def log(self, row: dict[str, Any]) -> None:
        step = self.clock.step_of(row)
        for tag, value in row_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """An offline wandb run under `<run>/wandb/` (`wandb sync` uploads it later), the run's config attached.

    A resumed run is another offline run, from the step after the saved state (wandb has no purge_step)."""

    def __init__(self, run_folder: Path, resumed_step: int, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(mode="offline", dir=str(run_folder), name=run_folder.name, config=config)
        self.clock = _StepClock(resumed_step)

    def log(self, row: dict[str, Any]) -> None:
        step = self.clock.step_of(row)
        scalars = row_scalars(row)
        if scalars:
            self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class Reporters:
    """Every chosen backend as one reporter (none chosen: it does nothing)."""

    def __init__(self, reporters: Sequence[Reporter] = ()) -> None:
        self.reporters = list(reporters)

    def log(self, row: dict[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log(row)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()


def open_reporter(names: Sequence[str], run_folder: Path, resumed_step: int, config: dict[str, Any]) -> Reporters:
    """The reporters `names` chooses for the run in `run_folder`, which continues after `resumed_step`
    steps (0: a fresh run); `config` (config.json's dict) is recorded where a backend keeps it."""
    builders = {
        TENSORBOARD: lambda: TensorBoardReporter(run_folder, resumed_step),
        WANDB: lambda: WandbReporter(run_folder, resumed_step, config),
    }
    with _global_generators_kept():
        return Reporters([builders[name]() for name in names])


@contextlib.contextmanager
def _global_generators_kept() -> Iterator[None]:
    """Whatever a backend draws at start-up (run ids, ...), the global generators the resume state saves
    stay as they were: a run with reporting saves the same state as one without."""
    import numpy as np
    import torch

    python, numpy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy)
        torch.set_rng_state(torch_state)
