"""Running `nemesis` under torchrun (gloo on the CPU) from tests, and comparing the run folders it writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

REPOSITORY = Path(__file__).resolve().parent.parent
TORCHRUN_TIMEOUT = 600


def subprocess_environment() -> dict[str, str]:
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join([str(REPOSITORY), environment.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    environment["HF_HUB_OFFLINE"] = "1"
    environment["OMP_NUM_THREADS"] = "1"  # two ranks on a shared CPU: no oversubscription
    return environment


def torchrun_command(ranks: int, arguments: list[str]) -> list[str]:
    """`torchrun --standalone --nproc-per-node RANKS -m nemesis_cli ARGUMENTS` (a free port is picked)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return [*launcher, "-m", "nemesis_cli", *arguments]


def run_torchrun(ranks: int, arguments: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        torchrun_command(ranks, arguments),
        env=subprocess_environment(),
        capture_output=True,
        text=True,
        timeout=TORCHRUN_TIMEOUT,
    )


def kill_torchrun_when(
    ranks: int, arguments: list[str], ready: Callable[[], bool], whole_job: bool = True
) -> subprocess.CompletedProcess:
    """Start torchrun, wait until `ready()` holds, then SIGKILL the whole job, or only its last rank."""
    process = subprocess.Popen(
        torchrun_command(ranks, arguments),
        env=subprocess_environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, apart from pytest's
    )
    deadline = time.monotonic() + TORCHRUN_TIMEOUT
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"torchrun ended before the kill point:\n{process.stdout.read()}")
            if time.monotonic() > deadline:
                raise AssertionError("torchrun never reached the kill point")
            time.sleep(0.05)
        workers = _worker_pids(process.pid)  # in sessions of their own: the agent's group does not hold them
        for pid in workers if whole_job else workers[-1:]:
            os.kill(pid, signal.SIGKILL)  # one rank: the agent then stops the others
        if whole_job:
            os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, output, "")


def _worker_pids(agent: int) -> list[int]:
    """The rank processes torchrun started (children of its agent), in start order."""
    children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    assert children, "torchrun has no rank processes"
    return sorted(int(pid) for pid in children)


def prompt_ctx(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "prompt.safetensors"))["ctx"]


def run_folders(tree: Path) -> list[Path]:
    """Every run folder under a grid tree, relative to it, sorted."""
    return sorted(path.parent.relative_to(tree) for path in tree.rglob("config.json"))
