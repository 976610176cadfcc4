"""Start-up of `nemesis --help` in a fresh process vs `python -c "import torch"`.

The CLI imports torch, open_clip, pandas and matplotlib only inside the commands that need them,
so its help should cost a fraction of importing torch alone. Each way runs in a fresh interpreter,
alternating, several times; the script checks the help came out and torch is really importable,
then prints the median seconds and, as its last line, `ratio: <import torch / nemesis --help>`.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

HELP = [sys.executable, "-m", "nemesis_cli", "--help"]
TORCH = [sys.executable, "-c", "import torch"]


def seconds(command: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, result.stdout


def main(repeats: int = 5) -> None:
    help_times, torch_times = [], []
    for _ in range(repeats):
        took, output = seconds(HELP)
        assert "Usage" in output and "train" in output, output
        help_times.append(took)
        torch_times.append(seconds(TORCH)[0])
    help_median, torch_median = statistics.median(help_times), statistics.median(torch_times)
    print(f"nemesis --help: {help_median:.3f} s   python -c 'import torch': {torch_median:.3f} s, medians of {repeats}")
    print(f"ratio: {torch_median / help_median:.2f}")


if __name__ == "__main__":
    main()
