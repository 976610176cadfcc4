"""What makes a training run resumable: its state after each epoch and its append-only journal.

The state (`state.safetensors`) holds ctx, SGD's momentum buffer and the global RNG states as
tensors, and the counters as JSON in the header: no pickled objects. The journal is metrics.jsonl
and log.txt; on resume, rows of an epoch that did not finish (or a torn last line) are dropped.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import safe_open, save_file

from .atomic import atomic_path
from .constants import RUN_LOG, RUN_METRICS
from .errors import NemesisError

RUN_STATE = "state.safetensors"
STATE_KEY = "nemesis_state"


@dataclass
class RunState:
    epoch: int  # epochs completed
    step: int  # steps completed
    ctx: torch.Tensor
    momentum: torch.Tensor | None
    extra: dict  # RNG states and the loss scaler


def save_state(path: Path, state: RunState) -> None:
    tensors = {"ctx": state.ctx.detach().float().cpu().contiguous(), "torch_rng": torch.get_rng_state()}
    if state.momentum is not None:
        tensors["momentum"] = state.momentum.detach().float().cpu().contiguous()
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
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={STATE_KEY: json.dumps(header)})


def load_state(path: Path) -> RunState:
    """The saved state, with the global RNG states restored."""
    try:
        with safe_open(str(path), framework="pt") as file:
            header = json.loads((file.metadata() or {})[STATE_KEY])
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except Exception as error:
        raise NemesisError(f"{path} is not a readable training state ({error}); delete it to restart") from error
    torch.set_rng_state(tensors["torch_rng"])
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("cuda_rng_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    version, python_state, gauss = header.pop("python_rng")
    random.setstate((version, tuple(python_state), gauss))
    name, keys, position, has_gauss, cached = header.pop("numpy_rng")
    np.random.set_state((name, np.array(keys, dtype=np.uint32), int(position), int(has_gauss), cached))
    epoch, step = header.pop("epoch"), header.pop("step")
    return RunState(epoch, step, tensors["ctx"], tensors.get("momentum"), header)


def read_finished_metrics(path: Path, last_epoch: int) -> str:
    """metrics.jsonl up to epoch `last_epoch`: rows of a later, unfinished epoch (or a torn line) dropped."""
    if not path.is_file():
        return ""
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if row.get("epoch", 0) <= last_epoch:
            kept.append(line + "\n")
    return "".join(kept)


class Journal:
    """metrics.jsonl and log.txt: rows appended after each epoch, just before the state is saved."""

    def __init__(self, out_dir: Path, echo: Callable[[str], None] | None, write: bool = True) -> None:
        self.metrics, self.log, self.echo = out_dir / RUN_METRICS, out_dir / RUN_LOG, echo
        self.write = write  # False on the ranks of a batch-sharded run that do not own the folder
        self.rows: list[dict] = []

    def say(self, line: str, show: bool = False) -> None:
        if self.write:
            with open(self.log, "a", encoding="utf-8") as file:
                file.write(line + "\n")
        if show and self.echo is not None:
            self.echo(line)

    def flush_rows(self) -> None:
        if self.write:
            with open(self.metrics, "a", encoding="utf-8") as file:
                file.write("".join(json.dumps(row) + "\n" for row in self.rows))
        self.rows = []
