"""The GPU path in one prepared run: `make gpu-check` (on the CPU: `--device cpu --quick`, run by the suite).

Checks, each marked ok or FAILED (figures are marked "info"):
- evaluation and a corruption sweep under the default evaluation autocast (fp16 on CUDA) against a
  plain fp32 pass on the same device (ViT-B-16 and RN50, random weights, 1,000 ImageNet-like class
  names, 2,000 random features): largest cosine difference, share of identical predictions,
  identical LNE decisions (whether each norm-reducing cell raised accuracy);
- a few training steps with `--precision amp` against fp32: loss and ctx within a stated tolerance;
- `torchrun --nproc-per-node 1` (NCCL on CUDA, gloo on the CPU) of a small grid and sweep: the same
  prompts and table as one process;
- speed: sweep cells per second at 1,000 classes, the text transformer's achieved TFLOP/s (FLOPs of
  the tokens actually run, counted by torch's FlopCounterMode) against the card's dense fp16 peak;
- peak GPU memory of an ImageNet-size sweep (1,000 classes, 50,000 cached features) and of a
  training step at batch 32 with 1,000 classes;
- PLOT's batched Sinkhorn: 8 variants side by side equal each variant's own run, in fp32 under
  evaluation's autocast, and the time of each way.

One summary table on stdout and, with `--json`, a JSON file; exit code 0 only if every check holds.
`--quick` shrinks everything (the tiny model, 20 classes, 200 features) so the CPU runs it in a minute.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPOSITORY), str(REPOSITORY / "benchmarks")]

from support.baseline import imagenet_like_classnames  # noqa: E402

from corrupt.engine import evaluate_cells  # noqa: E402
from corrupt.grid import parse_grid  # noqa: E402
from corrupt.operators import ORIGINAL, corrupted_variants, position_norm  # noqa: E402
from nemesis.evaluation.evaluate import EvaluationSetup  # noqa: E402
from nemesis.files.checkpoint import load_prompt  # noqa: E402
from nemesis.methods.coop.learner import PromptLearner  # noqa: E402
from nemesis.model.backbone import load_clip  # noqa: E402
from nemesis.precision import autocast_policy  # noqa: E402

# Tolerances of fp16 evaluation autocast against fp32 (cosine similarities lie in [-1, 1]).
MAX_COSINE_DIFFERENCE = 5e-3
MIN_SAME_PREDICTIONS = 0.99
# `--precision amp` (bf16 or fp16 autocast) against fp32 after a few SGD steps from the same start.
AMP_LOSS_TOLERANCE = 2e-2  # relative, per step
AMP_CTX_TOLERANCE = 2e-2  # relative Frobenius distance of the final ctx
# Dense fp16/bf16 tensor-core peaks (TFLOP/s) of the cards this project is lent.
PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0}


@dataclass
class Check:
    name: str
    ok: bool | None  # None: a figure, not a pass/fail check
    detail: str
    values: dict = field(default_factory=dict)

    @property
    def mark(self) -> str:
        return "info" if self.ok is None else "ok" if self.ok else "FAILED"


@dataclass(frozen=True)
class Size:
    models: tuple[str, ...]
    n_classes: int
    n_features: int
    n_ctx: int
    positions: str  # sweep positions
    imagenet_features: int  # features of the memory check's sweep (0: skipped)


FULL = Size(("ViT-B-16", "RN50"), 1000, 2000, 16, "0,15", 50_000)
QUICK = Size(("tiny",), 20, 200, 4, "0,3", 0)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _setting(model: str, size: Size, device: torch.device, n_features: int | None = None) -> EvaluationSetup:
    """Random weights, a random unified ctx, random features; labels the fp32 predictions of 60 % of
    the images (the rest random), so accuracy sits where corruptions move it."""
    backbone = load_clip(model, pretrained=None, device=device)
    width = backbone.model.token_embedding.weight.shape[1]
    ctx = torch.randn(size.n_ctx, width, generator=torch.Generator().manual_seed(0)) * 0.5
    learner = PromptLearner(backbone, imagenet_like_classnames(size.n_classes), ctx=ctx.to(device)).to(device)
    embed = backbone.model.text_projection.shape[-1] if backbone.model.text_projection is not None else width
    count = n_features or size.n_features
    features = torch.randn(count, embed, generator=torch.Generator().manual_seed(1)).to(device)
    generator = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        predicted = learner.similarities(features, learner.ctx.detach()[None])[0].argmax(-1).cpu()
    random_labels = torch.randint(size.n_classes, (count,), generator=generator)
    labels = torch.where(torch.rand(count, generator=generator) < 0.6, predicted, random_labels)
    return EvaluationSetup(backbone, None, learner, features, labels.to(device), {})


def _fp32_correct(setup: EvaluationSetup, ctx: torch.Tensor, cells) -> torch.Tensor:
    """The plain reference: each cell's variant classified in fp32, no autocast [K, N]."""
    rows = []
    with torch.inference_mode():
        for start in range(0, len(cells), 8):
            variants = corrupted_variants(ctx, cells[start : start + 8])
            predicted = setup.learner.similarities(setup.features, variants.to(setup.features.device)).argmax(-1)
            rows.append((predicted == setup.labels).cpu())
    return torch.cat(rows)


def _lne_decisions(correct: torch.Tensor, cells, ctx: torch.Tensor) -> list[bool]:
    """For each norm-reducing cell: whether it raised accuracy over the original prompt's."""
    original = next(index for index, cell in enumerate(cells) if cell.op == ORIGINAL)
    accuracy = correct.float().mean(dim=1)
    decisions = []
    for index, (cell, variant) in enumerate(zip(cells, corrupted_variants(ctx, cells), strict=True)):
        if cell.op == ORIGINAL:
            continue
        if position_norm(variant, cell.position, cell.site) < position_norm(ctx, cell.position, cell.site):
            decisions.append(bool(accuracy[index] > accuracy[original]))
    return decisions


def evaluation_checks(size: Size, device: torch.device) -> list[Check]:
    checks = []
    for model in size.models:
        setup = _setting(model, size, device)
        ctx = setup.learner.ctx.detach().cpu()
        with torch.inference_mode():
            reference = setup.learner.similarities(setup.features, ctx[None].to(device))[0].float()
            with autocast_policy(device).context():  # what evaluation and sweeps run under
                scored = setup.learner.similarities(setup.features, ctx[None].to(device))[0].float()
        difference = float((scored - reference).abs().max())
        same = float((scored.argmax(-1) == reference.argmax(-1)).float().mean())
        ok = difference <= MAX_COSINE_DIFFERENCE and same >= MIN_SAME_PREDICTIONS
        checks.append(Check(f"evaluation autocast vs fp32, {model}", ok,
                            f"max |cos diff| {difference:.2e}, same predictions {100 * same:.2f}%",
                            {"max_cosine_difference": difference, "same_predictions": same}))  # fmt: skip
        cells = parse_grid(positions=size.positions).cells(size.n_ctx)
        _synchronize(device)
        start = time.perf_counter()
        outcome = evaluate_cells(setup, ctx, cells)
        _synchronize(device)
        seconds = time.perf_counter() - start
        reference_correct = _fp32_correct(setup, ctx, cells)
        decisions, expected = _lne_decisions(outcome.correct, cells, ctx), _lne_decisions(reference_correct, cells, ctx)
        same_rows = float((outcome.correct == reference_correct).float().mean())
        checks.append(Check(f"sweep LNE decisions autocast vs fp32, {model}", decisions == expected,
                            f"{sum(a == b for a, b in zip(decisions, expected, strict=True))} of {len(expected)} "
                            f"norm-reducing cells decided alike; per-sample correctness {100 * same_rows:.2f}% alike",
                            {"decisions": len(expected), "same_correctness": same_rows}))  # fmt: skip
        checks.append(Check(f"sweep speed, {model}, {size.n_classes} classes", None,
                            f"{len(cells) / seconds:.2f} cells/s ({len(cells)} cells, {setup.labels.numel()} features)",
                            {"cells_per_second": len(cells) / seconds}))  # fmt: skip
        checks.append(_text_throughput(setup, ctx, device, model))
    return checks


def _text_throughput(setup: EvaluationSetup, ctx: torch.Tensor, device: torch.device, model: str) -> Check:
    """TFLOP/s of the text passes a sweep runs (FLOPs of the tokens actually run) against the card's peak."""
    from torch.utils.flop_counter import FlopCounterMode

    variants = ctx[None].repeat(8, 1, 1).to(device)
    with torch.inference_mode(), autocast_policy(device).context():
        with FlopCounterMode(display=False) as counter:  # one image: the text passes are nearly all of it
            setup.learner.similarities(setup.features[:1], variants)
        flops = counter.get_total_flops()
        setup.learner.similarities(setup.features[:1], variants)  # warm-up
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(3):
            setup.learner.similarities(setup.features[:1], variants)
        _synchronize(device)
    tflops = 3 * flops / (time.perf_counter() - start) / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((value for card, value in PEAK_TFLOPS.items() if card in name), None)
    share = f", {100 * tflops / peak:.1f}% of the {name}'s {peak:g}" if peak else ""
    return Check(f"text transformer throughput, {model}", None, f"{tflops:.3g} TFLOP/s{share}",
                 {"tflops": tflops, "peak_tflops": peak, "device": name})  # fmt: skip


def training_check(size: Size, device: torch.device, work: Path) -> Check:
    """`--precision amp` against fp32: a few steps on the same few-shot data from the same start."""
    from nemesis.data.testing import make_coop_folder
    from nemesis.training.configs import TrainConfig
    from nemesis.training.trainer import train

    root = work / "data"
    make_coop_folder(root, "oxford_pets", imagenet_like_classnames(4), per_class=(4, 1, 2), image_size=32)
    results = {}
    for precision in ("fp32", "amp"):
        config = TrainConfig(dataset="oxford_pets", root=str(root), model=size.models[0], pretrained=None, shots=4,
                             n_ctx=size.n_ctx, epochs=2, batch_size=4, lr=0.002, precision=precision,
                             device=str(device), eval_every=0, cache_dir=str(work / "cache"))  # fmt: skip
        out = work / f"run-{precision}"
        train(config, out, progress=False, echo=lambda line: None)
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses = [row["ce_loss"] for row in rows if row.get("kind") == "step"]
        results[precision] = (losses, load_prompt(out / "prompt.safetensors").ctx)
    (losses, ctx), (amp_losses, amp_ctx) = results["fp32"], results["amp"]
    loss_gap = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(amp_losses, losses, strict=True))
    ctx_gap = float(torch.linalg.vector_norm(amp_ctx - ctx) / torch.linalg.vector_norm(ctx))
    ok = loss_gap <= AMP_LOSS_TOLERANCE and ctx_gap <= AMP_CTX_TOLERANCE
    return Check("training --precision amp vs fp32", ok,
                 f"{len(losses)} steps: loss within {loss_gap:.1e} (<= {AMP_LOSS_TOLERANCE:g}), "
                 f"ctx within {ctx_gap:.1e} (<= {AMP_CTX_TOLERANCE:g})",
                 {"loss_gap": loss_gap, "ctx_gap": ctx_gap, "steps": len(losses)})  # fmt: skip


CELL_KEY = ["checkpoint", "op", "position", "factor", "noise_seed"]  # a cell, whatever folder its grid is in


def _nemesis(*arguments: str, torchrun: bool = False) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    command = [*(launcher if torchrun else [sys.executable]), "-m", "nemesis_cli", *arguments]
    environment = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[-8:])} failed: {result.stderr.strip().splitlines()[-1:]}")


def torchrun_check(size: Size, device: torch.device, work: Path) -> Check:
    """A small grid and its sweep under torchrun with one rank give the one process's prompts and table."""
    import pandas as pd

    from nemesis.data.testing import make_coop_folder
    from nemesis.files.checkpoint import load_prompt

    root = work / "torchrun-data"
    make_coop_folder(root, "oxford_pets", imagenet_like_classnames(4), per_class=(2, 1, 2), image_size=32)
    tables = {}
    prompts = {}
    for launcher in ("one", "torchrun"):
        out = work / f"grid-{launcher}"
        _nemesis("train", "--dataset", "oxford_pets", "--root", str(root), "--shots", "1,2", "--method", "coop,pan",
                 "--model", "tiny", "--pretrained", "none", "--n-ctx", "4", "--epochs", "2", "--batch-size", "4",
                 "--device", str(device), "--eval-every", "0", "--cache-dir", str(work / "cache"), "--out", str(out),
                 torchrun=launcher == "torchrun")  # fmt: skip
        table = work / f"sweep-{launcher}.csv"
        _nemesis("corrupt", str(out), "--rescale", "0.1", "--replace", "0", "--positions", "0,3", "--csv",
                 "--device", str(device), "--cache-dir", str(work / "cache"), "--out", str(table),
                 torchrun=launcher == "torchrun")  # fmt: skip
        prompts[launcher] = {path.relative_to(out): load_prompt(path).ctx for path in out.rglob("prompt.safetensors")}
        frame = pd.read_csv(table)
        frame["checkpoint"] = frame["checkpoint"].str.replace(str(out), "", regex=False)  # the grids' own folders
        tables[launcher] = frame.sort_values(CELL_KEY).reset_index(drop=True)
    same_prompts = prompts["one"].keys() == prompts["torchrun"].keys() and all(
        torch.equal(prompts["one"][key], prompts["torchrun"][key]) for key in prompts["one"]
    )
    columns = [*CELL_KEY, "accuracy", "norm_before", "norm_after"]
    same_table = tables["one"][columns].equals(tables["torchrun"][columns])
    return Check("torchrun --nproc-per-node 1 vs one process", same_prompts and same_table,
                 f"{len(prompts['one'])} prompts {'equal' if same_prompts else 'DIFFER'}, "
                 f"{len(tables['one'])} sweep rows {'equal' if same_table else 'DIFFER'}")  # fmt: skip


def memory_checks(size: Size, device: torch.device) -> list[Check]:
    """Peak GPU memory of an ImageNet-size sweep and of a training step at batch 32, 1,000 classes."""
    if device.type != "cuda" or not size.imagenet_features:
        return [Check("peak GPU memory", None, "measured on CUDA only")]
    checks = []
    torch.cuda.reset_peak_memory_stats(device)
    setup = _setting(size.models[0], size, device, n_features=size.imagenet_features)
    ctx = setup.learner.ctx.detach().cpu()
    base = torch.cuda.memory_allocated(device)
    evaluate_cells(setup, ctx, parse_grid(positions="0").cells(size.n_ctx))
    sweep_peak = torch.cuda.max_memory_allocated(device) - base
    checks.append(Check(f"peak GPU memory, sweep, {size.n_classes} classes x {size.imagenet_features:,} features", None,
                        f"+{sweep_peak / 2**20:,.0f} MiB", {"bytes": sweep_peak}))  # fmt: skip
    torch.cuda.reset_peak_memory_stats(device)
    learner = setup.learner
    learner.ctx.requires_grad_(True)
    base = torch.cuda.memory_allocated(device)
    logits = learner.logits(setup.features[:32])
    F.cross_entropy(logits, setup.labels[:32]).backward()
    step_peak = torch.cuda.max_memory_allocated(device) - base
    checks.append(Check(f"peak GPU memory, training step, batch 32, {size.n_classes} classes", None,
                        f"+{step_peak / 2**20:,.0f} MiB", {"bytes": step_peak}))  # fmt: skip
    return checks


def plot_transport_check(size: Size, device: torch.device) -> list[Check]:
    """PLOT's batched Sinkhorn: K variants side by side give each variant's own run (official rule), in fp32
    even under evaluation's autocast; and how long each way takes."""
    from nemesis.methods.plot.transport import transport_plans

    n_images, n_tokens = (100, 50) if size is FULL else (20, 17)
    generator = torch.Generator().manual_seed(3)
    pairs = n_images * size.n_classes
    similarities = (torch.rand(8, pairs, n_tokens, 4, generator=generator) * 0.6 + 0.1).to(device)  # [K, P, T, N]
    _synchronize(device)
    start = time.perf_counter()
    with autocast_policy(device).context():  # evaluation's fp16 autocast: the transport stays fp32
        batched = transport_plans(similarities)
    _synchronize(device)
    batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    alone = torch.cat([transport_plans(similarities[k : k + 1]) for k in range(similarities.shape[0])])
    _synchronize(device)
    alone_seconds = time.perf_counter() - start
    difference = float((batched - alone).abs().max())
    return [
        Check("PLOT Sinkhorn, variants side by side vs alone", difference <= 1e-6 and batched.dtype == torch.float32,
              f"max plan difference {difference:.1e}, {batched.dtype}", {"max_difference": difference}),
        Check(f"PLOT Sinkhorn speed, 8 variants x {pairs:,} pairs x {n_tokens} tokens", None,
              f"side by side {batched_seconds:.3f} s, one by one {alone_seconds:.3f} s",
              {"batched_seconds": batched_seconds, "alone_seconds": alone_seconds}),
    ]  # fmt: skip


def _guarded(name: str, run: Callable[[], list[Check]]) -> list[Check]:
    """A check that raises is a failed check, and the others still run."""
    try:
        return run()
    except Exception as error:  # the summary names it; the exit code says it failed
        return [Check(name, False, f"{type(error).__name__}: {error}")]


PARTS: dict[str, Callable[[Size, torch.device, Path], list[Check]]] = {
    "evaluation": lambda size, device, work: evaluation_checks(size, device),
    "training": lambda size, device, work: [training_check(size, device, work)],
    "torchrun": lambda size, device, work: [torchrun_check(size, device, work)],
    "memory": lambda size, device, work: memory_checks(size, device),
    "plot": lambda size, device, work: plot_transport_check(size, device),
}


def run_checks(size: Size, device: torch.device, parts: list[str]) -> list[Check]:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        os.environ.setdefault("NEMESIS_CACHE", str(work / "nemesis-cache"))
        return [check for part in parts for check in _guarded(part, lambda part=part: PARTS[part](size, device, work))]


def summary(checks: list[Check], device: torch.device, seconds: float) -> str:
    width = max(len(check.name) for check in checks)
    lines = [f"{check.mark:<6}  {check.name:<{width}}  {check.detail}" for check in checks]
    failed = sum(check.ok is False for check in checks)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines.append(f"{'FAILED' if failed else 'ok':<6}  {failed} of {sum(c.ok is not None for c in checks)} checks "
                 f"failed on {name} in {seconds:.0f} s")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the tiny model at reduced size (the default on a CPU)")
    parser.add_argument("--full", action="store_true", help="the full size even on a CPU (slow)")
    parser.add_argument("--json", type=Path, help="also write the checks here")
    parser.add_argument("--only", default=",".join(PARTS), help=f"some of {','.join(PARTS)} (a rerun of a part)")
    arguments = parser.parse_args(argv)
    parts = arguments.only.split(",")
    if unknown := sorted(set(parts) - set(PARTS)):
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    device = torch.device(arguments.device)
    start = time.perf_counter()
    quick = arguments.quick or (device.type == "cpu" and not arguments.full)
    checks = run_checks(QUICK if quick else FULL, device, parts)
    print(summary(checks, device, time.perf_counter() - start))
    if arguments.json is not None:
        arguments.json.write_text(json.dumps([dataclasses.asdict(check) for check in checks], indent=1))
    return 1 if any(check.ok is False for check in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
