"""`offload_teacher_model`: the teacher's weights leave the device between its forwards.

In CPU mode the "device" is the CPU too, so the mechanism is checked directly: between
forwards the teacher holds no device storage (only its LM-head shard on the last stage,
which the student's loss reads after the teacher pass), every forward loads it back and
offloads it again, and the training run is bit-identical to one without offload.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.helpers.trainer_runs import SGD


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("offload"))


def _train_and_watch_teacher(argv: list[str], steps: int) -> dict:
    from megatron_opd.config.job import load_job_config
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    teacher = trainer.teacher
    offload = teacher.offload
    resident = []  # teacher bytes on the device after each step (offloadable tensors only)
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step().get("loss"))
        if offload is not None:
            resident.append(offload.resident_bytes())
    params = {name: param for name, param in teacher.model.named_parameters()}
    stored = {name: param.numel() for name, param in params.items()}
    with teacher.on_device():
        loaded = {name: param.numel() for name, param in params.items()}
        loaded_bytes = offload.resident_bytes() if offload is not None else None
    return {"losses": losses, "resident": resident, "stored_numel": stored, "loaded_numel": loaded,
            "loaded_bytes": loaded_bytes, "host_bytes": offload.host_bytes if offload else None,
            "loads": offload.loads if offload else None, "offloads": offload.offloads if offload else None,
            "weights": {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}}


@pytest.mark.parametrize("seq_kd", [False, True], ids=["dataset_responses", "seq_kd"])
def test_offloaded_teacher_trains_identically_and_leaves_the_device(setup, tmp_path, seq_kd):
    """PP=2 (each stage offloads its own layers; the last keeps its LM head): two steps
    with and without offload give bit-identical losses and student weights. seq_kd samples
    the responses from the teacher, one more use of its weights per step."""
    fields = {**SGD, "training.micro_batch_size": 2, "parallel.pipeline_model_parallel_size": 2,
              "lmbda": 0, "seq_kd": seq_kd, "max_completion_length": 4}
    plain = run_distributed(_train_and_watch_teacher, 2, overrides(setup, tmp_path / "plain", **fields), 2,
                            timeout=300)
    offloaded = run_distributed(_train_and_watch_teacher, 2,
                                overrides(setup, tmp_path / "offload", offload_teacher_model=True, **fields), 2,
                                timeout=300)
    for rank, (expected, actual) in enumerate(zip(plain, offloaded)):
        assert actual["losses"] == expected["losses"], rank
        for name, tensor in expected["weights"].items():
            assert torch.equal(actual["weights"][name], tensor), (rank, name)
        # Between forwards nothing offloadable is on the device; during one, all of it is.
        assert actual["resident"] == [0, 0], (rank, actual["resident"])
        assert actual["loaded_bytes"] == actual["host_bytes"] > 0, rank
        released = {name for name, numel in actual["stored_numel"].items() if numel == 0}
        assert released and all(actual["loaded_numel"][name] == expected["stored_numel"][name]
                                for name in actual["loaded_numel"]), rank
        kept = set(actual["stored_numel"]) - released
        head = {"output_layer.weight"} if rank == 1 else set()
        assert kept == head, (rank, kept)
        # One load per teacher use: per step one forward (+ one sampling pass with seq_kd),
        # plus the on_device() above; every load is followed by an offload.
        uses_per_step = 2 if seq_kd else 1
        assert actual["loads"] == 2 * uses_per_step + 1, (rank, actual["loads"])
        assert actual["offloads"] == actual["loads"] + 1  # the first one at start


def test_offload_is_refused_for_the_dynamic_self_teacher():
    from megatron_opd.teachers.local import LocalTeacher

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="offload is invalid for the student's own weights"):
        LocalTeacher(model, offload=True, is_student=True)
