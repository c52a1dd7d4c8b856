"""Checkpoint and file-system mistakes a user makes get one line naming the file or field and
what to do (a `UserError`), never a traceback: a truncated or mismatched HF model directory,
a checkpoint of another model shape, a `model` / `teacher_model` that is not a model, an
output directory that cannot be written (a file in the way, read-only, a full disk: nothing
half-written is left and a previous checkpoint stays intact), and an exported config.json
that states the dtype of the weights actually written.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_opd.checkpoint import hf_io
from megatron_opd.checkpoint.errors import CheckpointMismatchError, OutputDirError
from megatron_opd.checkpoint.hf_io import HFWeightReader, StreamingSafetensorsWriter
from megatron_opd.checkpoint.megatron_checkpoint import atomic_output_dir
from megatron_opd.checkpoint.pretrained import inspect_pretrained
from megatron_opd.commands.convert import main as convert_main
from megatron_opd.config import ModelConfig, ParallelConfig, UserError
from megatron_opd.testing import run_distributed
from tests.hf_models import make_hf_model, make_tokenizer

SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def assert_one_line(error: BaseException, *parts) -> str:
    """A UserError whose message is one line holding every one of `parts`."""
    assert isinstance(error, UserError), f"{type(error).__name__} is no UserError: {error}"
    message = str(error)
    assert "\n" not in message, message
    for part in parts:
        assert str(part) in message, f"{part!r} not in: {message}"
    return message


def no_leftovers(directory: Path) -> list[str]:
    """Temporary (staging / replaced) directories an output write left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A one-layer fp32 Llama with a tokenizer (config.json says "dtype": "float32")."""
    return make_hf_model("llama2", tmp_path_factory.mktemp("hf") / "llama", num_hidden_layers=1,
                         with_tokenizer=True)


@pytest.fixture
def sharded(hf_dir, tmp_path) -> Path:
    """`hf_dir` in two safetensors shards with an index, as HF writes large models."""
    directory = tmp_path / "sharded"
    shutil.copytree(hf_dir, directory)
    (directory / hf_io.SINGLE_FILE).unlink()
    with safe_open(hf_dir / hf_io.SINGLE_FILE, framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    names = sorted(tensors)
    parts = {SHARDS[0]: names[: len(names) // 2], SHARDS[1]: names[len(names) // 2:]}
    for file, part in parts.items():
        save_file({name: tensors[name] for name in part}, directory / file, metadata={"format": "pt"})
    weight_map = {name: file for file, part in parts.items() for name in part}
    (directory / hf_io.INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def truncate(file: Path) -> None:
    with open(file, "r+b") as handle:
        handle.truncate(file.stat().st_size // 2)


# --- 1. a truncated or mismatched HF model directory ---------------------------------------


def test_truncated_safetensors_names_the_file_and_says_download_again(hf_dir, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    truncate(broken / "model.safetensors")
    with pytest.raises(UserError) as caught:
        inspect_pretrained(broken)
    assert_one_line(caught.value, broken / "model.safetensors", "truncated or corrupt", "download it again")

    # The command: one line, exit 1, no traceback, nothing written.
    assert convert_main(["hf-to-megatron", "--hf-path", str(broken), "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{broken / 'model.safetensors'} is truncated or corrupt" in err, err
    assert not (tmp_path / "out").exists() and no_leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["truncated_shard", "missing_shard", "index_not_json", "index_wrong_shard"])
def test_sharded_model_damage_names_the_file(sharded, damage):
    index = sharded / hf_io.INDEX_FILE
    if damage == "truncated_shard":
        truncate(sharded / SHARDS[1])
        expected = (sharded / SHARDS[1], "truncated or corrupt", "download it again")
    elif damage == "missing_shard":
        (sharded / SHARDS[1]).unlink()
        expected = (sharded, hf_io.INDEX_FILE, SHARDS[1], "not there", "download the model again")
    elif damage == "index_not_json":
        index.write_text(index.read_text()[:40])
        expected = (index, "is not valid JSON", "download it again")
    else:  # an index entry pointing at a shard that does not hold the tensor
        content = json.loads(index.read_text())
        name = next(name for name, file in content["weight_map"].items() if file == SHARDS[0])
        content["weight_map"][name] = SHARDS[1]
        index.write_text(json.dumps(content))
        expected = (index, name, SHARDS[1], "does not match the shard files", "download the index")
    with pytest.raises(UserError) as caught:
        inspect_pretrained(sharded)
    assert_one_line(caught.value, *expected)


def test_index_missing_an_entry_the_config_needs(sharded):
    """A tensor dropped from the index: refused at load (before any weight is copied), naming
    the directory and the tensor."""
    from megatron_opd.checkpoint.hf_weights import check_hf_tensor_names

    index = sharded / hf_io.INDEX_FILE
    content = json.loads(index.read_text())
    del content["weight_map"]["model.layers.0.mlp.up_proj.weight"]
    index.write_text(json.dumps(content))
    source = inspect_pretrained(sharded)
    with pytest.raises(UserError) as caught:
        check_hf_tensor_names(HFWeightReader(sharded), source.model)
    assert_one_line(caught.value, sharded, "model.layers.0.mlp.up_proj.weight", "download the model again")


# --- 2. a Megatron checkpoint of another model shape ----------------------------------------

SMALL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    ffn_hidden_size=128, vocab_size=250, make_vocab_size_divisible_by=64)


def load_into_other_shapes_on_rank(directory: str) -> list[tuple[type, str]]:
    """Save a SMALL checkpoint, then load it into a model of another hidden size
    (load_model_checkpoint, as load_pretrained does) and, as a resume does, into one with
    another layer count (load_training_checkpoint)."""
    from megatron_opd.checkpoint.megatron_checkpoint import CheckpointInfo, load_model_checkpoint, save_model_checkpoint
    from megatron_opd.models import build_gpt_model
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.checkpointing import load_training_checkpoint

    runtime = initialize_runtime(ParallelConfig())
    out = Path(directory)
    out.mkdir()
    save_model_checkpoint(build_gpt_model(SMALL, runtime), CheckpointInfo(SMALL, "llama", "fp32", {}), out)
    results = []
    for changes, load in (({"hidden_size": 32}, load_model_checkpoint),
                          ({"num_layers": 3}, lambda model, path: load_training_checkpoint(path, model, None))):
        try:
            load(build_gpt_model(dataclasses.replace(SMALL, **changes), runtime), out)
            results.append((None, "loaded"))
        except Exception as error:  # noqa: BLE001 - handed back to the test
            results.append((type(error), str(error)))
    return results


def test_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(tmp_path):
    checkpoint = tmp_path / "ckpt"
    (hidden_kind, hidden), (layers_kind, layers) = run_distributed(
        load_into_other_shapes_on_rank, 1, str(checkpoint), timeout=180)[0]
    for kind, message in ((hidden_kind, hidden), (layers_kind, layers)):
        assert kind is not None and issubclass(kind, CheckpointMismatchError) and issubclass(kind, UserError), \
            (kind, message)
        assert "\n" not in message and str(checkpoint) in message and "megatron_opd_model.json" in message
        assert "training.output_dir" in message, message
    assert "tensor 'embedding.word_embeddings.weight' has shape (256, 64) in the checkpoint and (256, 32)" in hidden
    assert "hidden_size 64 vs 32" in hidden, hidden
    assert "has shape (2, 64) in the checkpoint and (3, 64) in this model" in layers and "num_layers 2 vs 3" in layers


# --- 3. model / teacher_model that is not a model --------------------------------------------


@pytest.mark.parametrize("field", ["teacher_model", "model"])
@pytest.mark.parametrize("what", ["missing", "no_config_json"])
def test_model_path_that_is_not_a_model_names_the_field(hf_dir, tmp_path, field, what, capsys):
    from megatron_opd.commands.train import main as train_main
    from tests.gkd_setup import overrides

    bad = tmp_path / "not_a_model"
    if what == "no_config_json":
        bad.mkdir()
        shutil.copy(hf_dir / "model.safetensors", bad)
    make_tokenizer(tmp_path / "tokenizer")
    setup = {"student": str(hf_dir), "teacher": str(hf_dir), "tokenizer": str(tmp_path / "tokenizer"),
             "train": str(tmp_path / "train.jsonl"), "val": str(tmp_path / "val.jsonl")}
    argv = overrides(setup, tmp_path / "run", **{field: str(bad)})
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert f"{field}={bad} is invalid: " in err, err
    assert ("does not exist" if what == "missing" else "neither an HF model directory") in err, err


# --- 4. an output directory that cannot be written --------------------------------------------


def test_convert_out_under_a_regular_file(hf_dir, tmp_path, capsys, monkeypatch):
    """Refused up front, before a process group or a model is made."""
    import megatron_opd.runtime

    def no_runtime(*args, **kwargs):
        raise AssertionError("the runtime was started before --out was checked")

    monkeypatch.setattr(megatron_opd.runtime, "initialize_runtime", no_runtime)
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    out = blocker / "converted"
    assert convert_main(["hf-to-megatron", "--hf-path", str(hf_dir), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "File exists" not in err, err
    assert f"cannot create {out}: {blocker} is a file, not a directory" in err, err
    assert blocker.read_text() == "not a directory" and no_leftovers(tmp_path) == []


def test_atomic_output_dir_turns_a_file_in_the_way_into_a_user_error(tmp_path, monkeypatch):
    """Past the up-front check (a file appearing between check and write), the mkdir's
    EEXIST / ENOTDIR is explained too."""
    from megatron_opd.checkpoint import megatron_checkpoint

    monkeypatch.setattr(megatron_checkpoint, "check_output_dir", lambda out, force: None)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for out in (blocker / "ckpt", blocker / "deeper" / "ckpt"):  # EEXIST, ENOTDIR
        with pytest.raises(OutputDirError) as caught:
            with atomic_output_dir(out):
                pass
        assert_one_line(caught.value, out, f"{blocker} is a file, not a directory", "choose another output")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("how", ["access", "mkdir_eacces", "mkdir_erofs"])
def test_read_only_output_dir(tmp_path, monkeypatch, how):
    parent = tmp_path / "read_only"
    parent.mkdir()
    out = parent / "ckpt"
    real_mkdir, real_access = Path.mkdir, os.access
    if how == "mkdir_erofs" or os.geteuid() == 0:  # root writes anywhere: stand in for the OS
        code = errno.EROFS if how == "mkdir_erofs" else errno.EACCES

        def mkdir(self, *args, **kwargs):
            if self.parent == parent:
                raise OSError(code, os.strerror(code), str(self))
            return real_mkdir(self, *args, **kwargs)

        if how == "access":  # the up-front check (before any process group)
            monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != parent and real_access(path, mode))
        else:  # past it: creating the directory fails
            monkeypatch.setattr(os, "access", lambda path, mode, **kw: True)
            monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        parent.chmod(0o555)
    try:
        with pytest.raises(OutputDirError) as caught:
            with atomic_output_dir(out):
                raise AssertionError("never reached")
    finally:
        parent.chmod(0o755)
    reason = "read-only file system" if how == "mkdir_erofs" else "not writable"
    assert_one_line(caught.value, out, parent, reason, "choose another output directory")
    assert list(parent.iterdir()) == []


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


def test_full_disk_while_exporting_hf_weights_keeps_the_previous_export(tmp_path, monkeypatch):
    """The trainer's HF export streams safetensors (`StreamingSafetensorsWriter`): a full
    disk midway raises one line, removes the staging directory and leaves the previous
    export as it was."""
    out = tmp_path / "hf"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"previous export")
    real_open = open
    monkeypatch.setattr(hf_io, "open", lambda path, mode="r": _FullDisk(real_open(path, mode), room=2048),
                        raising=False)
    plan = [(f"t{i}", (64, 64), torch.float32) for i in range(4)]
    with pytest.raises(OutputDirError) as caught:
        with atomic_output_dir(out, force=True) as staging:
            writer = StreamingSafetensorsWriter(staging, plan)
            for name, shape, dtype in plan:
                writer.write(name, torch.zeros(shape, dtype=dtype))
            writer.close()
    assert_one_line(caught.value, out, "no space left on the device", "free some space")
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"previous export"
    assert no_leftovers(tmp_path) == []


def save_onto_a_full_disk_on_rank(directory: str) -> dict:
    """Save a checkpoint, then save again over it (force, as an export does) with dist-checkpointing's
    lowest write failing as on a full disk: an OSError(ENOSPC) in its writer process, and torch.save's
    zip writer's "unexpected pos" (a RuntimeError). Returns each failure and the surviving checkpoint."""
    import megatron.core.dist_checkpointing.strategies.filesystem_async as filesystem_async

    from megatron_opd.checkpoint.megatron_checkpoint import CheckpointInfo, load_model_checkpoint, save_model_checkpoint
    from megatron_opd.models import build_gpt_model
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig())
    out = Path(directory) / "ckpt"
    info = CheckpointInfo(SMALL, "llama", "fp32", {})
    with atomic_output_dir(out) as staging:
        save_model_checkpoint(build_gpt_model(SMALL, runtime), info, staging)
    before = sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = torch.save

    def zip_writer_fails(obj, file, *args, **kwargs):
        if str(file).endswith(".pt"):  # dist-checkpointing's common.pt (Megatron-Core < 0.19)
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
        return real_save(obj, file, *args, **kwargs)

    import megatron.core
    from packaging.version import Version

    cases = [("enospc", filesystem_async, "_write_item", no_space)]
    # Megatron-Core 0.19 keeps the common state inside the torch_dist files (no common.pt, no
    # torch.save of its own), so this failure cannot be staged there.
    if Version(megatron.core.__version__).release < (0, 19):
        cases.append(("unexpected_pos", torch, "save", zip_writer_fails))
    failures = {}
    for name, module, attribute, replacement in cases:
        original = getattr(module, attribute)
        setattr(module, attribute, replacement)
        try:
            with atomic_output_dir(out, force=True) as staging:
                save_model_checkpoint(build_gpt_model(SMALL, runtime), info, staging)
            failures[name] = (None, "saved")
        except BaseException as error:  # noqa: BLE001 - CheckpointException is a BaseException
            failures[name] = (type(error), str(error))
        finally:
            setattr(module, attribute, original)
    after = sorted((str(p.relative_to(out)), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    load_model_checkpoint(build_gpt_model(SMALL, runtime), out)  # still a loadable checkpoint
    return {"failures": failures, "unchanged": before == after,
            "leftovers": sorted(p.name for p in Path(directory).iterdir() if p.name != "ckpt")}


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(tmp_path):
    result = run_distributed(save_onto_a_full_disk_on_rank, 1, str(tmp_path), timeout=180)[0]
    out = tmp_path / "ckpt"
    for name, (kind, message) in result["failures"].items():
        assert kind is not None and issubclass(kind, OutputDirError), (name, kind, message)
        assert "\n" not in message and f"cannot write {out}: " in message and "free some space" in message, message
    # Megatron-Core 0.16 passes the worker's OSError on; 0.19 only its class (no errno)
    enospc = result["failures"]["enospc"][1]
    assert "no space left on the device" in enospc or "dist-checkpointing reports an OSError" in enospc, enospc
    if "unexpected_pos" in result["failures"]:
        assert "unexpected pos 704 vs 598" in result["failures"]["unexpected_pos"][1]
        assert "full disk" in result["failures"]["unexpected_pos"][1]
    assert result["unchanged"] and result["leftovers"] == []


# --- 5. the exported config.json states the weights' dtype --------------------------------------


def export_bf16_on_rank(exports: list[tuple[str, str]]) -> None:
    """The trainer's HF export (`Trainer.export_hf`, run on a stand-in trainer) of fp32 HF
    models trained in bf16: (source, out) pairs."""
    from megatron_opd.checkpoint.pretrained import load_pretrained
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.trainer.trainer import Trainer

    runtime = initialize_runtime(ParallelConfig())
    for hf_path, out in exports:
        source = inspect_pretrained(hf_path)
        model = load_pretrained(source, runtime, dtype=torch.bfloat16)
        trainer = SimpleNamespace(runtime=runtime, student_source=source, model=model, dtype=torch.bfloat16)
        Trainer.export_hf(trainer, Path(out))


def convert_on_rank(argv: list[str]) -> int:
    return convert_main(argv)


def assert_config_states_weights_dtype(directory: Path) -> None:
    from transformers import AutoConfig

    with safe_open(directory / "model.safetensors", framework="pt") as handle:
        dtypes = {handle.get_tensor(name).dtype for name in handle.keys()}
    assert dtypes == {torch.bfloat16}, dtypes
    raw = json.loads((directory / "config.json").read_text())
    assert raw["dtype"] == "bfloat16" and raw.get("torch_dtype", "bfloat16") == "bfloat16", raw
    assert AutoConfig.from_pretrained(directory).dtype == torch.bfloat16


def fp32_source(hf_dir: Path, directory: Path, dtype_key: str) -> Path:
    """`hf_dir` (fp32) with its dtype under `dtype_key`: "dtype" as transformers 5 writes it,
    "torch_dtype" as transformers 4 did."""
    shutil.copytree(hf_dir, directory)
    config = json.loads((directory / "config.json").read_text())
    config[dtype_key] = config.pop("dtype")
    assert config[dtype_key] == "float32"
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_trainer_export_config_states_the_weights_dtype(hf_dir, tmp_path):
    keys = ("dtype", "torch_dtype")
    sources = [fp32_source(hf_dir, tmp_path / f"source_{key}", key) for key in keys]
    exports = [(str(source), str(tmp_path / f"exported_{key}")) for source, key in zip(sources, keys)]
    run_distributed(export_bf16_on_rank, 1, exports, timeout=180)
    for _, out in exports:
        assert_config_states_weights_dtype(Path(out))


def test_converted_config_states_the_weights_dtype(hf_dir, tmp_path):
    """fp32 HF -> bf16 Megatron checkpoint -> HF: both configs say bfloat16."""
    source = fp32_source(hf_dir, tmp_path / "source", "torch_dtype")
    checkpoint, converted = tmp_path / "megatron", tmp_path / "converted"
    argv = ["hf-to-megatron", "--hf-path", str(source), "--out", str(checkpoint), "--dtype", "bf16"]
    assert run_distributed(convert_on_rank, 1, argv, timeout=180) == [0]
    assert json.loads((checkpoint / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    argv = ["megatron-to-hf", "--megatron-path", str(checkpoint), "--out", str(converted)]
    assert run_distributed(convert_on_rank, 1, argv, timeout=180) == [0]
    assert_config_states_weights_dtype(converted)
