"""Hostile and damaged files: each is refused with one line and exit 2, runs nothing, writes nothing,
poisons nothing loaded after it, and stays within a bounded amount of memory and time."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, save_prompt
from nemesis.unpickle import load_torch_file, loads_pickle
from nemesis_cli.main import app

from .conftest import fails_with_one_line
from .hostile_files import (
    Pickle,
    ctx_file,
    dassl_content,
    legacy_file,
    shell_payload,
    storage_id,
    tar_file,
    tensor,
    write_torch_zip,
)

SECONDS_PER_CASE = 10


@contextlib.contextmanager
def deadline(seconds: int = SECONDS_PER_CASE):
    """Fail a case that takes longer than `seconds` (a hang, e.g. reading /dev/stdin), instead of waiting forever."""

    def expire(signum, frame):
        raise TimeoutError(f"case took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _with_ctx(pickler: Pickle, push) -> bytes:
    return dassl_content(pickler, push)


# --- the cases: each writes one hostile file at `path`; `marker` is where a payload would write ------


def reduce_os_system(path, marker):
    return write_torch_zip(path, shell_payload(marker))


def stack_global(path, marker):
    pickler = Pickle(protocol=4).stack_global("os", "system").text(f"touch {marker}").raw(pickle.TUPLE1)
    return write_torch_zip(path, pickler.reduce().stop())


def inst_opcode(path, marker):
    return write_torch_zip(path, f"(S'touch {marker}'\nios\nsystem\n.".encode())


def obj_opcode(path, marker):
    return write_torch_zip(path, Pickle().mark().global_("os", "system").text(f"touch {marker}").raw(pickle.OBJ).stop())


def newobj_opcode(path, marker):
    pickler = Pickle().global_("subprocess", "Popen").mark().text("touch").text(str(marker)).tuple()
    return write_torch_zip(path, pickler.raw(pickle.TUPLE1).raw(pickle.NEWOBJ).stop())


def build_on_function(path, marker):
    """Break 2: BUILD on an allowed function, setting `__defaults__` so later tensors come back wrong."""
    pickler = Pickle().global_("torch._utils", "_rebuild_tensor_v2").none().empty_dict().text("__defaults__")
    pickler.mark().raw(pickle.NEWTRUE).tuple().setitem().raw(pickle.TUPLE2).build().pop()
    return write_torch_zip(path, pickler.empty_dict().stop())


def build_on_class(path, marker):
    """Break 1's first step: BUILD on an allowed class, setting `dump_patches` / `__name__`."""
    pickler = Pickle().global_("collections", "OrderedDict").none().empty_dict()
    pickler.text("dump_patches").raw(pickle.NEWTRUE).setitem().text("__name__").text(str(marker)).setitem()
    return write_torch_zip(path, pickler.raw(pickle.TUPLE2).build().stop())


def module_persistent_id(path, marker):
    """Break 1's second step: a `('module', ...)` persistent id, which makes torch write a `.patch` file."""
    pickler = Pickle().mark().text("module").global_("collections", "OrderedDict").text(str(marker)).text("src")
    return write_torch_zip(path, pickler.tuple().raw(pickle.BINPERSID).stop())


def allowed_bytearray(path, marker):
    """Break 5: torch's allow-list holds `bytearray`; 6 GB from a few bytes."""
    pickler = Pickle().global_("builtins", "bytearray").integer(6 * 2**30).raw(pickle.TUPLE1).reduce()
    return write_torch_zip(path, pickler.stop())


def bytearray8_opcode(path, marker):
    """Protocol 5's BYTEARRAY8 allocates the declared length before reading it."""
    return write_torch_zip(path, b"\x80\x05" + pickle.BYTEARRAY8 + struct_q(6 * 2**30) + b"." * 8)


def struct_q(value: int) -> bytes:
    return value.to_bytes(8, "little")


def stride_zero_view(path, marker):
    """Break 4/5: a stride-0 fp16 view of 16 GiB over a 2-byte storage."""
    push = lambda p: tensor(p, "0", 1, (65536, 131072), (0, 0), storage_type="HalfStorage")  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": b"\0\0"})


def zip_bomb(path, marker):
    """Break 5: a deflated storage member inflating to 64 MB from a few kB."""
    push = lambda p: tensor(p, "0", 16 * 2**20, (16, 2**20), (2**20, 1))  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": bytes(64 * 2**20)}, zipfile.ZIP_DEFLATED)


def storage_larger_than_member(path, marker):
    push = lambda p: tensor(p, "0", 2**30, (2**15, 2**15), (2**15, 1))  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": bytes(4)})


def sparse_tensor(path, marker):
    pickler = Pickle().global_("torch._utils", "_rebuild_sparse_tensor").mark().global_("torch", "sparse_coo")
    return write_torch_zip(path, pickler.tuple().reduce().stop())


def meta_tensor(path, marker):
    pickler = Pickle().global_("torch._utils", "_rebuild_meta_tensor_no_storage").mark().global_("torch", "float32")
    return write_torch_zip(path, int_args(pickler).tuple().reduce().stop())


def int_args(pickler: Pickle) -> Pickle:
    return pickler.mark().integer(2**17).integer(2**17).tuple().mark().integer(2**17).integer(1).tuple()


def non_contiguous_ctx(path, marker):
    push = lambda p: tensor(p, "0", 32, (8, 4), (1, 8))  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": bytes(128)})


def integer_ctx(path, marker):
    push = lambda p: tensor(p, "0", 32, (4, 8), (8, 1), storage_type="LongStorage")  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": bytes(256)})


def too_many_positions(path, marker):
    return ctx_file(path, torch.zeros(100, 8))


def nan_ctx(path, marker):
    return ctx_file(path, torch.full((4, 8), float("nan")))


def deep_nesting(path, marker):
    """Break 6/8's nesting: 100k nested tuples from 100 kB (code walking them would overflow the stack)."""
    push = lambda p: p.raw(pickle.EMPTY_TUPLE + pickle.TUPLE1 * 100_000)  # noqa: E731
    return write_torch_zip(path, _with_ctx(Pickle(), push))


def extension_code(path, marker):
    return write_torch_zip(path, Pickle().raw(pickle.EXT1 + b"\x01").stop())


def storage_from_non_storage(path, marker):
    pickler = Pickle().global_("torch._utils", "_rebuild_tensor_v2").mark().text("not a storage").integer(0)
    return write_torch_zip(path, pickler.mark().integer(4).tuple().mark().integer(1).tuple().tuple().reduce().stop())


def shared_storage_declared_twice(path, marker):
    def push(pickler):
        pickler.mark()
        storage_id(pickler, "0", 4)
        storage_id(pickler, "0", 8, "DoubleStorage")
        pickler.tuple()

    return write_torch_zip(path, _with_ctx(Pickle(), push), {"0": bytes(16)})


def legacy_format(path, marker):
    return legacy_file(path, marker)


def tar_format(path, marker):
    return tar_file(path)


def truncated_archive(path, marker):
    ctx_file(path, torch.randn(4, 8))
    path.write_bytes(path.read_bytes()[:-40])
    return path


def damaged_storage(path, marker):
    ctx_file(path, torch.randn(4, 8))
    data = bytearray(path.read_bytes())
    offset = data.index(b"archive/data/0") + len("archive/data/0") + 4
    data[offset] ^= 0xFF  # one bit flip in the storage bytes: the member's CRC no longer matches
    path.write_bytes(bytes(data))
    return path


def random_bytes(path, marker):
    path.write_bytes(os.urandom(4096))
    return path


def metadata_not_an_object(path, marker):
    save_file({"ctx": torch.zeros(4, 8)}, str(path), metadata={"nemesis": "[1, 2, 3]"})
    return path


def metadata_wrong_types(path, marker):
    save_file({"ctx": torch.zeros(4, 8)}, str(path), metadata={"nemesis": '{"classnames": 5, "dataset": 7}'})
    return path


def metadata_deep(path, marker):
    save_file({"ctx": torch.zeros(4, 8)}, str(path), metadata={"nemesis": "[" * 100_000 + "]" * 100_000})
    return path


def metadata_huge_method(path, marker):
    """Break 3: a 60 MB method string (rich's highlighter used to stall on it)."""
    metadata = json.dumps({"method": "x" * 60_000_000})
    save_file({"ctx": torch.zeros(4, 8)}, str(path), metadata={"nemesis": metadata})
    return path


def safetensors_integer_ctx(path, marker):
    save_file({"ctx": torch.zeros(4, 8, dtype=torch.int64)}, str(path), metadata={"nemesis": "{}"})
    return path


HOSTILE_CASES = {
    case.__name__: case
    for case in (
        reduce_os_system,
        stack_global,
        inst_opcode,
        obj_opcode,
        newobj_opcode,
        build_on_function,
        build_on_class,
        module_persistent_id,
        allowed_bytearray,
        bytearray8_opcode,
        stride_zero_view,
        zip_bomb,
        storage_larger_than_member,
        sparse_tensor,
        meta_tensor,
        non_contiguous_ctx,
        integer_ctx,
        too_many_positions,
        nan_ctx,
        deep_nesting,
        extension_code,
        storage_from_non_storage,
        shared_storage_declared_twice,
        legacy_format,
        tar_format,
        truncated_archive,
        damaged_storage,
        random_bytes,
        metadata_not_an_object,
        metadata_wrong_types,
        metadata_deep,
        metadata_huge_method,
        safetensors_integer_ctx,
    )
}

SAFETENSORS_CASES = {name for name in HOSTILE_CASES if name.startswith(("metadata", "safetensors"))}


@pytest.fixture
def workplace(tmp_path, monkeypatch):
    """A working folder (the current directory) and a marker folder where payloads would write."""
    work, markers = tmp_path / "work", tmp_path / "markers"
    work.mkdir()
    markers.mkdir()
    monkeypatch.chdir(work)
    return work, markers


def _snapshot(*folders: Path) -> set[Path]:
    return {path for folder in folders for path in folder.rglob("*")}


@pytest.mark.parametrize("case", sorted(HOSTILE_CASES))
def test_hostile_checkpoint_is_refused_with_one_line(case, workplace, tmp_path):
    work, markers = workplace
    suffix = ".safetensors" if case in SAFETENSORS_CASES else ".pth.tar-1"
    path = HOSTILE_CASES[case](tmp_path / f"hostile{suffix}", markers / "pwned")
    before = _snapshot(work, markers, tmp_path)
    with deadline():
        fails_with_one_line(["prompt", "info", str(path)], str(path))
    assert _snapshot(work, markers, tmp_path) == before  # nothing written, anywhere we can see


def test_poisoning_file_leaves_later_loads_unchanged(tmp_path):
    """Break 2: a file that patches a function must not change any checkpoint loaded after it."""
    legit = ctx_file(tmp_path / "legit.pth.tar-1", torch.arange(32.0).reshape(4, 8))
    expected = load_checkpoint(legit).ctx.clone()
    defaults_before = torch._utils._rebuild_tensor_v2.__defaults__
    for case in (build_on_function, build_on_class, module_persistent_id):
        with pytest.raises(NemesisError, match="refusing"):
            load_checkpoint(case(tmp_path / f"{case.__name__}.pth.tar-1", tmp_path / "pwned"))
        assert torch.equal(load_checkpoint(legit).ctx, expected)
    assert torch._utils._rebuild_tensor_v2.__defaults__ == defaults_before
    assert getattr(collections.OrderedDict, "dump_patches", None) is None
    assert not list(tmp_path.glob("*.patch")) and not (tmp_path / "pwned").exists()


def test_real_coop_buffers_that_are_views_of_one_embedding_still_load(tmp_path):
    """CoOp registers token_prefix/suffix as slices of one embedding: strided views inside a storage are fine."""
    from .test_checkpoint import write_dassl_checkpoint

    path = write_dassl_checkpoint(tmp_path / "seed1", torch.randn(16, 64))
    embedding = torch.randn(3, 77, 64)
    content = torch.load(path, weights_only=False)
    content["state_dict"]["token_prefix"] = embedding[:, :1, :]
    content["state_dict"]["token_suffix"] = embedding[:, 17:, :]
    torch.save(content, path)
    loaded = load_torch_file(path)
    assert torch.equal(loaded["state_dict"]["token_suffix"], embedding[:, 17:, :])
    assert torch.equal(loaded["state_dict"]["token_prefix"], embedding[:, :1, :])
    assert torch.equal(load_checkpoint(path).ctx, content["state_dict"]["ctx"])


AMPLIFYING_CASES = (allowed_bytearray, bytearray8_opcode, stride_zero_view, zip_bomb, storage_larger_than_member)


def test_amplifying_files_stay_within_bounded_memory(tmp_path):
    """Break 5: files of a few kB that used to reach gigabytes; peak memory measured in a fresh process."""
    paths = [case(tmp_path / f"{case.__name__}.pth.tar-1", tmp_path / "pwned") for case in AMPLIFYING_CASES]
    script = textwrap.dedent(
        """
        import resource, sys
        from nemesis.files.checkpoint import load_checkpoint
        from nemesis.errors import NemesisError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for path in sys.argv[1:]:
            try:
                load_checkpoint(path)
            except NemesisError:
                pass
            else:
                raise SystemExit(f"{path} was accepted")
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    environment = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, env=environment, timeout=60
    )
    assert done.returncode == 0, done.stderr
    grown_mib = int(done.stdout.split()[-1])
    assert grown_mib < 100, f"peak memory grew by {grown_mib} MiB"


def test_legit_pickles_of_every_protocol_load(tmp_path):
    value = {"train": [1, 2.5, "a", (None, True)], "nested": {"b": [b"x"]}}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        assert loads_pickle(pickle.dumps(value, protocol=protocol)) == value


# --- property tests: any bytes end in a loaded prompt or the one-line error -------------------------


_LEGIT: dict[str, bytes] = {}  # one legitimate archive, built on first use


def _legit_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("legit")
    return ctx_file(folder / "legit.pth.tar-1", torch.randn(4, 8)).read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_unpickler_ends_in_a_prompt_or_one_error(tmp_path_factory, data):
    legit = _LEGIT.get("bytes") or _LEGIT.setdefault("bytes", _legit_bytes(tmp_path_factory))
    start = legit.index(b"archive/data.pkl") + len(b"archive/data.pkl")
    pickle_bytes = legit[start : start + 400]
    kind = data.draw(st.sampled_from(["mutate", "random"]))
    if kind == "mutate":
        mutated = bytearray(pickle_bytes)
        for _ in range(data.draw(st.integers(1, 8))):
            mutated[data.draw(st.integers(0, len(mutated) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(mutated)
    else:
        blob = data.draw(st.binary(max_size=300))
    with contextlib.suppress(NemesisError):
        loads_pickle(blob)
    folder = tmp_path_factory.mktemp("case")
    path = write_torch_zip(folder / "case.pth.tar-1", blob, {"0": bytes(128)})
    try:
        prompt = load_checkpoint(path)
    except NemesisError:
        return
    assert prompt.ctx.dtype == torch.float32


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
_field_names = st.sampled_from([f.name for f in dataclasses.fields(PromptMetadata)])


@settings(max_examples=200, deadline=None)
@given(document=st.dictionaries(_field_names, _json_values, max_size=8) | _json_values)
def test_metadata_parser_ends_in_metadata_or_one_error(document):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unknown keys warn; that is the tolerant path, not an error
            metadata = PromptMetadata.from_json(json.dumps(document), "fuzzed")
    except NemesisError as error:
        assert "\n" not in str(error)
        return
    # what was accepted round-trips through the writer unchanged
    assert PromptMetadata.from_json(json.dumps(dataclasses.asdict(metadata)), "again") == metadata


def test_metadata_fields_are_checked_against_their_annotations(tmp_path):
    ctx = torch.zeros(4, 8)
    for bad in ({"classnames": 5}, {"model": ["ViT-B-32"]}, {"dataset": 7}, {"shots": "4"}, {"seed": True}):
        path = tmp_path / "p.safetensors"
        save_file({"ctx": ctx}, str(path), metadata={"nemesis": json.dumps(bad)})
        with pytest.raises(NemesisError, match=f"field '{next(iter(bad))}'"):
            load_checkpoint(path)
    good = save_prompt(tmp_path / "good.safetensors", ctx, PromptMetadata(classnames=["a"], shots=4, seed=1))
    assert load_checkpoint(good).metadata.classnames == ["a"]


# --- sweeps refuse every bad input before any work (break 7) and overflowing factors (break 11) ------

SWEEP_CLASSES = ["red square", "green circle", "blue star"]


@pytest.fixture
def sweep(tmp_path):
    from nemesis.data.testing import make_coop_folder

    make_coop_folder(tmp_path / "data", "oxford_pets", classnames=SWEEP_CLASSES, per_class=(1, 1, 2))
    metadata = PromptMetadata(
        model="tiny", weights_id="random-seed0", dataset="oxford_pets", shots=2, seed=1, prompt_method="coop"
    )  # trained on random weights, and says so
    good = save_prompt(tmp_path / "good.safetensors", torch.randn(4, 64) * 0.5, metadata)
    (tmp_path / "out").mkdir()
    return tmp_path, good, metadata


def _sweep_args(tmp_path, *checkpoints, extra=()):
    return ["corrupt", *map(str, checkpoints), "--out", str(tmp_path / "out" / "r.parquet"), "--root",
            str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", *extra]  # fmt: skip


LATE_REFUSALS = {
    "class position": (dict(prompt_config={"class_position": "sideways"}), (4, 64)),
    "subsample": (dict(subsample="weird"), (4, 64)),
    "not a pretrained tag of tiny": (dict(pretrained="/nowhere/weights.pt"), (4, 64)),
    "classes": ({}, (5, 4, 64)),  # class-specific ctx for 5 classes; the dataset has 3
    "context length": ({}, (75, 64)),
}


def _written_as_given(path, ctx, metadata):
    """A prompt file holding exactly this metadata (save_prompt would refuse a bad option when writing)."""
    from safetensors.torch import save_file

    save_file({"ctx": ctx.contiguous()}, str(path), metadata={"nemesis": json.dumps(dataclasses.asdict(metadata))})
    return path


@pytest.mark.parametrize("expected", sorted(LATE_REFUSALS))
def test_sweep_refuses_a_later_bad_checkpoint_before_any_work(sweep, expected):
    tmp_path, good, metadata = sweep
    changes, shape = LATE_REFUSALS[expected]
    bad = _written_as_given(
        tmp_path / "bad.safetensors", torch.randn(*shape) * 0.5, dataclasses.replace(metadata, **changes)
    )
    before = _snapshot(tmp_path)
    result = fails_with_one_line(_sweep_args(tmp_path, good, bad), expected)
    assert "bad.safetensors" in result.output
    assert _snapshot(tmp_path) == before  # no table, no cache, no progress of the good checkpoint


@pytest.mark.parametrize("flag", ["--rescale", "--replace"])
def test_sweep_refuses_factors_that_overflow_fp32(sweep, flag):
    tmp_path, good, _ = sweep
    before = _snapshot(tmp_path)
    fails_with_one_line(_sweep_args(tmp_path, good, extra=(flag, "1e39")), "overflows")
    fails_with_one_line(_sweep_args(tmp_path, good, extra=(flag, "1e37")), "overflows")
    assert _snapshot(tmp_path) == before


def test_poisoned_file_in_a_sweep_is_refused_before_the_legit_one_runs(sweep):
    tmp_path, good, _ = sweep
    poison = build_on_function(tmp_path / "poison.pth.tar-1", tmp_path / "pwned")
    before = _snapshot(tmp_path)
    fails_with_one_line(_sweep_args(tmp_path, poison, good, extra=("--model", "tiny")), "refusing")
    assert _snapshot(tmp_path) == before


# --- few-shot pickles (break 8) --------------------------------------------------------------------


@pytest.fixture
def pets(tmp_path):
    from nemesis.data.testing import make_coop_folder

    make_coop_folder(tmp_path, "oxford_pets", SWEEP_CLASSES, per_class=(3, 2, 1), image_size=8)
    return tmp_path


def _bad_subsets(full):
    from nemesis.data.datasets import Sample

    first = full.train[0]
    outside = str(Path(first.path).parent / ".." / ".." / ".." / "secret.jpg")
    return {
        "label NaN": [Sample(first.path, float("nan"), first.classname)],
        "label text": [Sample(first.path, "abc", first.classname)],
        "label 99": [Sample(first.path, 99, first.classname)],
        "label -3": [Sample(first.path, -3, first.classname)],
        "path outside": [Sample(outside, first.label, first.classname)],
    }


@pytest.mark.parametrize("case", ["label NaN", "label text", "label 99", "label -3", "path outside"])
def test_hostile_fewshot_pickle_is_refused(pets, case):
    from nemesis.data.datasets import load_dataset
    from nemesis.data.testing import write_fewshot_pickle

    full = load_dataset("oxford_pets", pets)
    write_fewshot_pickle(pets / "oxford_pets", 1, 1, _bad_subsets(full)[case], None)
    with pytest.raises(NemesisError, match=r"label|outside") as error:
        load_dataset("oxford_pets", pets, shots=1, seed=1)
    assert "\n" not in str(error.value)


def test_deeply_nested_fewshot_pickle_is_refused(pets):
    from nemesis.data.datasets import load_dataset

    folder = pets / "oxford_pets" / "split_fewshot"
    folder.mkdir(parents=True, exist_ok=True)
    nested = Pickle().empty_dict().text("train").raw(pickle.EMPTY_LIST + pickle.TUPLE1 * 100_000).setitem().stop()
    (folder / "shot_1-seed_1.pkl").write_bytes(nested)
    with pytest.raises(NemesisError, match="nests"):
        load_dataset("oxford_pets", pets, shots=1, seed=1)


def test_saved_fewshot_json_with_paths_outside_is_refused(pets):
    from nemesis.data.datasets import load_dataset

    load_dataset("oxford_pets", pets, shots=1, seed=1)  # draws and saves the subset as JSON
    saved = pets / "oxford_pets" / "split_fewshot" / "shot_1-seed_1.json"
    content = json.loads(saved.read_text())
    for bad in (["../../secret.jpg", 0, "red square"], ["/etc/passwd", 0, "red square"], ["images/a.jpg", 1e9, "x"]):
        content["train"][0] = bad
        saved.write_text(json.dumps(content))
        with pytest.raises(NemesisError, match=r"outside|inside|label"):
            load_dataset("oxford_pets", pets, shots=1, seed=1)
    saved.write_text("7")
    with pytest.raises(NemesisError, match="not a nemesis few-shot subset"):
        load_dataset("oxford_pets", pets, shots=1, seed=1)


# --- damaged run folders on --resume (breaks 10, 13), numeric overflow in training (break 11) -------


RUN_CLASSES = ["red apple", "green leaf", "blue sky"]


def _run_config(root, **options):
    from nemesis.training.configs import TrainConfig

    values = dict(dataset="oxford_pets", root=str(root), shots=2, seed=2, model="tiny", pretrained=None,
                  n_ctx=4, epochs=3, batch_size=4, lr=0.05, device="cpu")  # fmt: skip
    return TrainConfig(**(values | options))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped after epoch 2 of 3 (as a kill after the state save leaves it), and its data folder."""
    from nemesis.data.testing import make_coop_folder

    from .test_trainer import train_until_interrupted

    base = tmp_path_factory.mktemp("run")
    make_coop_folder(base / "data", "oxford_pets", RUN_CLASSES, per_class=(2, 1, 2), image_size=16)
    train_until_interrupted(_run_config(base / "data"), base / "run", after_epoch=2)
    return base


@pytest.fixture
def stopped(stopped_run, tmp_path):
    import shutil

    shutil.copytree(stopped_run / "run", tmp_path / "run")
    return stopped_run / "data", tmp_path / "run"


def _resume(data, out):
    from nemesis.training.configs import read_run_config
    from nemesis.training.trainer import train

    return train(read_run_config(out), out, resume=True, progress=False)


def _edit_json_line(path, number, change):
    lines = path.read_text().splitlines()
    lines[number] = change(lines[number])
    path.write_text("\n".join(lines) + "\n")


DAMAGED_RUNS = {
    "metrics line": ("metrics.jsonl", lambda p: _edit_json_line(p, 1, lambda line: line[:10]), "damaged at line 2"),
    "metrics epoch row": ("metrics.jsonl", lambda p: _drop_epoch_row(p, 1), "lacks the rows of finished epoch 1"),
    "config edited": (
        "config.json",
        lambda p: p.write_text(p.read_text().replace('"lr": 0.05', '"lr": 0.5')),
        "was changed after the run saved its state",
    ),
    "config wrong type": (
        "config.json",
        lambda p: p.write_text(p.read_text().replace('"shots": 2', '"shots": "2"')),
        "config.json",
    ),
    "config not an object": ("config.json", lambda p: p.write_text("7"), "not a run config"),
    "state bit flip": ("state.safetensors", lambda p: _flip_last_byte(p), "damaged or was edited"),
    "state truncated": ("state.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "damaged or was edited"),
}


def _drop_epoch_row(path, epoch):
    rows = [
        line
        for line in path.read_text().splitlines()
        if json.loads(line) != {**json.loads(line), "kind": "epoch", "epoch": epoch}
    ]
    path.write_text("".join(row + "\n" for row in rows))


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("case", sorted(DAMAGED_RUNS))
def test_damaged_run_folder_is_refused_on_resume_with_one_line(stopped, case):
    data, out = stopped
    name, damage, expected = DAMAGED_RUNS[case]
    damage(out / name)
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    with pytest.raises(NemesisError, match=re.escape(expected)) as error:
        _resume(data, out)
    assert "\n" not in str(error.value) and name in str(error.value)
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before  # nothing changed


def test_resume_after_a_kill_between_log_and_state_writes_each_line_once(stopped):
    data, out = stopped
    # a kill after epoch 3's log line and metrics rows, before its state save; and an orphaned temporary file
    with open(out / "log.txt", "a") as log:
        log.write("epoch [3/3] lr 1.0000e-05 loss 1.0 mean_norm 1.0\n")
    with open(out / "metrics.jsonl", "a") as metrics:
        metrics.write('{"kind": "epoch", "epoch": 3, "test_acc": 1.0')  # torn by the kill
    (out / ".state.safetensors.x1y2.tmp").write_bytes(b"half")
    _resume(data, out)
    log = (out / "log.txt").read_text()
    assert log.count("epoch [3/3]") == 1 and log.count("epoch [2/3]") == 1 and log.count("* accuracy:") == 1
    assert not list(out.glob(".*.tmp"))
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == sorted(epochs) and [e for e in epochs if e == 3]  # epoch 3 rows, once, in order


def test_learning_rate_that_overflows_is_refused_and_leaves_no_folder(stopped_run, tmp_path):
    from nemesis.training.trainer import train

    with pytest.raises(NemesisError, match="lr must be a finite number"):
        _run_config(stopped_run / "data", lr=float("inf"))
    with pytest.raises(NemesisError, match="diverged in epoch") as error:
        train(_run_config(stopped_run / "data", lr=1e30, epochs=2, warmup_epochs=0), tmp_path / "run", progress=False)
    assert "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()
    (tmp_path / "empty").mkdir()  # a folder made for the run beforehand: kept, and empty again
    with pytest.raises(NemesisError, match="diverged in epoch"):
        train(_run_config(stopped_run / "data", lr=1e30, epochs=2, warmup_epochs=0), tmp_path / "empty", progress=False)
    assert (tmp_path / "empty").is_dir() and not list((tmp_path / "empty").iterdir())
    with pytest.raises(NemesisError, match="seed must be below"):
        _run_config(stopped_run / "data", seed=2**64)


def test_damaged_cache_entry_is_encoded_again_exactly(stopped_run, tmp_path):
    from nemesis.data.datasets import load_dataset
    from nemesis.data.feature_cache import encode_split
    from nemesis.model.backbone import load_clip

    backbone = load_clip("tiny")
    data = load_dataset("oxford_pets", stopped_run / "data")
    first, _ = encode_split(backbone, data, "test", cache_dir=tmp_path, progress=False)
    (entry,) = tmp_path.glob("*.safetensors")
    for damage in ("flip", "zero"):
        raw = bytearray(entry.read_bytes())
        if damage == "flip":
            raw[-3] ^= 0x10
        else:
            raw[-64:] = bytes(64)
        entry.write_bytes(bytes(raw))
        again, _ = encode_split(backbone, data, "test", cache_dir=tmp_path, progress=False)
        assert torch.equal(again, first)  # the damaged entry was noticed and encoded again, not read
        assert entry.read_bytes() != bytes(raw)
    with pytest.raises(NemesisError, match="is a file"):
        encode_split(backbone, data, "test", cache_dir=entry, progress=False)


# --- other inputs that used to end in a traceback (break 12) ----------------------------------------


def _png_header_only(path, width, height):
    """A PNG whose header declares width x height (the pixels are never needed to refuse it)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_image_is_refused_with_one_line(pets):
    from nemesis.data.datasets import load_dataset

    data = load_dataset("oxford_pets", pets)
    sample = data.test[0]
    _png_header_only(Path(sample.path), 20000, 20000)
    with deadline(), pytest.raises(NemesisError, match="too large to decode safely"):
        data.open_image(sample)
    _png_header_only(Path(sample.path), 10000, 10000)  # above MAX_IMAGE_PIXELS, below twice it: PIL only warns
    with deadline(), pytest.raises(NemesisError, match="too large to decode safely"):
        data.open_image(sample)


@pytest.mark.parametrize(
    ("content", "expected"),
    [("7", "top level is not an object"), (None, "labels must run 0..n-1"), ("[" * 100_000, "not valid JSON")],
)
def test_damaged_split_file_is_refused_with_one_line(pets, content, expected):
    from nemesis.data.datasets import load_dataset

    split = next((pets / "oxford_pets").glob("split_zhou_*.json"))
    if content is None:  # one label of 1e9: used to build a 1e9-element set (5 GB)
        values = json.loads(split.read_text())
        values["train"][0][1] = 10**9
        content = json.dumps(values)
    split.write_text(content)
    with deadline(), pytest.raises(NemesisError, match=re.escape(expected)) as error:
        load_dataset("oxford_pets", pets)
    assert "\n" not in str(error.value)


def test_run_folder_with_a_foreign_checkpoint_name_still_loads(tmp_path):
    from nemesis.constants import RUN_CHECKPOINTS, RUN_CONFIG

    run = tmp_path / "run"
    (run / RUN_CHECKPOINTS).mkdir(parents=True)
    (run / RUN_CONFIG).write_text("{}")
    save_prompt(run / RUN_CHECKPOINTS / "epoch-0002.safetensors", torch.ones(4, 8), PromptMetadata(epoch=2))
    save_prompt(run / RUN_CHECKPOINTS / "epoch-final.safetensors", torch.zeros(4, 8), PromptMetadata())
    assert load_checkpoint(run).metadata.epoch == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["corrupt"], "Missing argument"),
        (["prompt", "info"], "Missing argument"),
        (["corrupt", "x.safetensors", "--no-such-flag"], "No such option"),
        (["no-such-command"], "No such command"),
        (["train", "--lr", "abc"], "Invalid value"),
    ],
)
def test_usage_errors_are_one_line(args, expected):
    fails_with_one_line(args, expected)


def test_eval_out_that_is_a_folder_is_refused_before_work(sweep):
    tmp_path, good, _ = sweep
    before = _snapshot(tmp_path)
    fails_with_one_line(
        ["eval", str(good), "--root", str(tmp_path / "data"), "--out", str(tmp_path / "out")], "is a folder"
    )
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("case", ["reduce_os_system", "build_on_function", "legacy_format", "stride_zero_view"])
def test_hostile_checkpoint_is_refused_by_eval_and_corrupt(case, workplace, tmp_path):
    work, markers = workplace
    path = HOSTILE_CASES[case](tmp_path / "model.pth.tar-1", markers / "pwned")
    (tmp_path / "out").mkdir()
    before = _snapshot(work, markers, tmp_path)
    common = ["--model", "tiny", "--dataset", "fashion_mnist", "--cache-dir", str(tmp_path / "cache")]
    with deadline():
        fails_with_one_line(["eval", str(path), *common, "--out", str(tmp_path / "out" / "e.jsonl")], str(path))
        fails_with_one_line(["corrupt", str(path), *common, "--out", str(tmp_path / "out" / "r.parquet")], str(path))
    assert _snapshot(work, markers, tmp_path) == before


@pytest.mark.parametrize("recorded", ["/etc/passwd", "weights file"])
def test_a_prompt_file_never_chooses_the_weights_file_eval_and_corrupt_read(sweep, recorded):
    """A prompt's metadata naming a local file (a system file, or real weights) does not make eval or
    corrupt read it: one line asking for --pretrained, nothing written; named, the file is used."""
    from nemesis.model.backbone import file_sha256

    from .conftest import cached_backbone

    tmp_path, _, metadata = sweep
    weights = tmp_path / "tiny-weights.pt"
    torch.save(cached_backbone("tiny").model.state_dict(), weights)
    path = str(weights) if recorded == "weights file" else recorded
    changes = dict(pretrained=path, weights_id=f"sha256:{file_sha256(weights)}")
    prompt = save_prompt(tmp_path / "named.safetensors", torch.randn(4, 64), dataclasses.replace(metadata, **changes))
    evaluation = ["eval", str(prompt), "--root", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"),
                  "--device", "cpu", "--out", str(tmp_path / "out" / "e.jsonl")]  # fmt: skip
    before = _snapshot(tmp_path)
    for args in (evaluation, _sweep_args(tmp_path, prompt)):
        result = fails_with_one_line(args, f"records weights '{path}', which is not a pretrained tag of tiny")
        assert "does not choose which file is read" in result.output and "--pretrained" in result.output
    assert _snapshot(tmp_path) == before

    result = CliRunner().invoke(app, [*evaluation, "--pretrained", str(weights)])
    assert result.exit_code == 0, result.output
    assert "note:" not in result.output  # the named file is the one the prompt records
    record = json.loads((tmp_path / "out" / "e.jsonl").read_text())
    assert record["pretrained"] == str(weights) and record["weights_id"] == changes["weights_id"]
