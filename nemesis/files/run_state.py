"""What makes a training run resumable: its state after each epoch and its append-only journal.

The state (`state.safetensors`) holds ctx, SGD's momentum buffer and the global RNG states as
tensors, and the counters as JSON in the header: no pickled objects. The journal is metrics.jsonl
and log.txt; on resume, rows of an epoch that did not finish (or a torn last line) are dropped.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from safetensors.torch import safe_open, save_file

from ..atomic import atomic_path
from ..checksum import tensors_sha256
from ..constants import RUN_LOG, RUN_METRICS
from ..errors import NemesisError
from ..wording import plural

RUN_STATE = "state.safetensors"
STATE_KEY = "nemesis_state"
LEARNER_PREFIX = "learner."  # tensors of the learner besides ctx (CoCoOp's meta-net) and their momenta


@dataclass
class RunState:
    epoch: int  # epochs completed
    step: int  # steps completed
    ctx: torch.Tensor
    momentum: torch.Tensor | None
    extra: dict  # RNG states and the loss scaler
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # the learner's other parameters and momenta


DIGEST_KEY = "nemesis_state_sha256"
# What Dassl's trainer prints between the last epoch and the result block (final model: last epoch);
# CoOp's parse_test_res.py reads accuracy only after the first of them.
DASSL_CLOSING = ("Finish training", "Deploy the last-epoch model", "Evaluate on the *test* set")
_EPOCH_LINE = re.compile(r"epoch \[(\d+)/")


def save_state(path: Path, state: RunState) -> None:
    tensors = {"ctx": state.ctx.detach().float().cpu().contiguous(), "torch_rng": torch.get_rng_state()}
    if state.momentum is not None:
        tensors["momentum"] = state.momentum.detach().float().cpu().contiguous()
    for name, tensor in state.tensors.items():
        tensors[LEARNER_PREFIX + name] = tensor.detach().float().cpu().contiguous()
    if torch.cuda.is_available():
        for index, rng in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_rng_{index}"] = rng
    version, python_state, gauss = random.getstate()
    numpy_state = np.random.get_state()
    header = {
        "epoch": state.epoch,
        "step": state.step,
        "python_rng": [version, list(python_state), gauss],
        "numpy_rng": [numpy_state[0], numpy_state[1].tolist(), *(float(value) for value in numpy_state[2:])],
        **state.extra,
    }
    header_text = json.dumps(header)
    metadata = {STATE_KEY: header_text, DIGEST_KEY: tensors_sha256(tensors, header_text)}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)


def load_state(path: Path) -> RunState:
    """The saved state, checked against its checksum, with the global RNG states restored."""
    damaged = f"{path} is damaged or was edited; delete it (the run restarts from epoch 0) or the whole run folder"
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
        header_text = metadata[STATE_KEY]
        if metadata.get(DIGEST_KEY) != tensors_sha256(tensors, header_text):
            raise NemesisError(f"{damaged} (its checksum does not match)")
        header = json.loads(header_text)
        version, python_state, gauss = header.pop("python_rng")
        name, keys, position, has_gauss, cached = header.pop("numpy_rng")
        epoch, step = header.pop("epoch"), header.pop("step")
        if not all(isinstance(value, int) and value >= 0 for value in (epoch, step)):
            raise ValueError("epoch and step must be counts")
        python_rng = (version, tuple(python_state), gauss)
        numpy_rng = (name, np.array(keys, dtype=np.uint32), int(position), int(has_gauss), cached)
        random.Random().setstate(python_rng)  # checked on a private generator before the global one
        np.random.RandomState().set_state(numpy_rng)
        ctx, torch_rng = tensors["ctx"], tensors["torch_rng"]
        torch.Generator().set_state(torch_rng)
    except NemesisError:
        raise
    except Exception as error:
        raise NemesisError(f"{damaged} ({type(error).__name__}: {str(error)[:100]})") from None
    torch.set_rng_state(torch_rng)
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("cuda_rng_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    learner = {key[len(LEARNER_PREFIX) :]: value for key, value in tensors.items() if key.startswith(LEARNER_PREFIX)}
    return RunState(epoch, step, ctx, tensors.get("momentum"), header, learner)


def read_finished_metrics(path: Path, last_epoch: int) -> str:
    """metrics.jsonl up to epoch `last_epoch`: rows of a later, unfinished epoch and a torn last line dropped.

    Any other damage (a line that is not a row, a finished epoch without its row) is refused: the
    rows are results, and silently dropping finished ones would change them.
    """
    if not path.is_file():
        if last_epoch:
            raise NemesisError(
                f"{path} is missing but the run finished {plural(last_epoch, 'epoch')}; restore it or rerun"
            )
        return ""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    lines.pop()  # the empty rest after the final newline, or a last line torn by a kill
    kept, finished = [], set()
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("epoch", 0), int):
            raise NemesisError(f"{path} is damaged at line {number}; restore it, or delete the run folder and rerun")
        if row.get("epoch", 0) <= last_epoch:
            kept.append(line + "\n")
            if row.get("kind") == "epoch":
                finished.add(row["epoch"])
    missing = sorted(set(range(1, last_epoch + 1)) - finished)
    if missing:
        raise NemesisError(
            f"{path} lacks the rows of finished epoch {missing[0]}; restore it, or delete the run folder and rerun"
        )
    return "".join(kept)


def read_finished_log(path: Path, last_epoch: int) -> str:
    """log.txt without the lines of an epoch that did not finish (a kill between its log line and its
    state save) and without a result block that did not finish, so a resumed run writes them once."""
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    lines.pop()  # the empty rest after the final newline, or a torn last line
    for index, line in enumerate(lines):
        match = _EPOCH_LINE.match(line)
        if (match and int(match.group(1)) > last_epoch) or line == DASSL_CLOSING[0]:
            lines = lines[:index]
            break
    return "".join(line + "\n" for line in lines)


def remove_orphans(folder: Path) -> None:
    """Delete temporary files that a killed atomic write left behind (`.NAME.*.tmp`, see nemesis.atomic)."""
    for orphan in folder.glob(".*.tmp"):
        if orphan.is_file():
            orphan.unlink(missing_ok=True)


def strict_json_row(row: dict) -> dict:
    """The row with every non-finite float (inf, nan: no JSON value) as None, written null, as a missing
    value is: readers of metrics.jsonl take null as "no number" (pandas: NaN)."""
    return {key: _finite_or_none(value) for key, value in row.items()}


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list | tuple):
        return [_finite_or_none(entry) for entry in value]
    if isinstance(value, dict):
        return strict_json_row(value)
    return value


class RowSink(Protocol):
    """Where rows go besides metrics.jsonl (the live logs of `nemesis.training.reporting`)."""

    def log(self, row: dict) -> None: ...

    def close(self) -> None: ...


class Journal:
    """metrics.jsonl and log.txt: rows appended after each epoch, just before the state is saved.

    `reporter` gets each row as it is written to metrics.jsonl, so live logs show the same values."""

    def __init__(
        self, out_dir: Path, echo: Callable[[str], None] | None, write: bool = True, reporter: RowSink | None = None
    ) -> None:
        self.metrics, self.log, self.echo = out_dir / RUN_METRICS, out_dir / RUN_LOG, echo
        self.write = write  # False on the ranks of a batch-sharded run that do not own the folder
        self.reporter = reporter
        self.rows: list[dict] = []

    def say(self, line: str, show: bool = False) -> None:
        if self.write:
            with open(self.log, "a", encoding="utf-8") as file:
                file.write(line + "\n")
        if show and self.echo is not None:
            self.echo(line)

    def flush_rows(self) -> None:
        if self.write:
            # Strict JSON: the trainer stops a run before a non-finite value reaches a row; should one
            # still come, it is written null, and allow_nan=False makes sure no `Infinity` or `NaN`
            # (invalid JSON) is ever written.
            rows = [strict_json_row(row) for row in self.rows]
            with open(self.metrics, "a", encoding="utf-8") as file:
                file.write("".join(json.dumps(row, allow_nan=False) + "\n" for row in rows))
            if self.reporter is not None:
                for row in rows:
                    self.reporter.log(row)
        self.rows = []

    def close(self) -> None:
        """Close the live logs, if any (metrics.jsonl and log.txt are closed after every write)."""
        if self.reporter is not None:
            self.reporter.close()
            self.reporter = None
