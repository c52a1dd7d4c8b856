"""The launchers' process count: the GPUs the job may use, not every GPU on the node.

`nvidia-smi` lists every GPU whatever CUDA_VISIBLE_DEVICES says, so a job given two of
eight GPUs would start eight ranks. The scripts run here with a stand-in `nvidia-smi`
(four GPUs) and a stand-in interpreter that prints the torchrun command it was given.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'\n" for i in range(4)))
    python = bin_dir / "python-stand-in"
    python.write_text('#!/bin/sh\necho "$@" "device=${MEGATRON_OPD_DEVICE:-}"\n')
    for file in (smi, python):
        file.chmod(0o755)
    return bin_dir


def _launch(fake_bin: Path, with_smi: bool = True, **env) -> str:
    path = f"{fake_bin}:{os.environ['PATH']}" if with_smi else "/usr/bin:/bin"
    base = {key: value for key, value in os.environ.items() if key not in ("CUDA_VISIBLE_DEVICES", "NPROC")}
    result = subprocess.run(["bash", str(REPO / "examples/megatron/train.sh"), "c.yaml"], capture_output=True,
                            text=True, check=True,
                            env={**base, "PATH": path, "PYTHON": str(fake_bin / "python-stand-in"), **env})
    return result.stdout


@pytest.mark.parametrize("visible, nproc, device", [
    (None, 4, ""), ("0,2", 2, ""), ("3", 1, ""), (" 1, 2 ,3", 3, ""), ("", 2, "cpu"),
], ids=["all", "two", "one", "spaces", "none_is_cpu"])
def test_nproc_counts_the_visible_gpus(fake_bin, visible, nproc, device):
    env = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    out = _launch(fake_bin, **env)
    assert f"--nproc-per-node {nproc} " in out and out.strip().endswith(f"device={device}"), out


def test_nproc_given_wins_and_no_gpu_means_cpu(fake_bin):
    assert "--nproc-per-node 3 " in _launch(fake_bin, NPROC="3", CUDA_VISIBLE_DEVICES="0")
    out = _launch(fake_bin, with_smi=False)
    assert "--nproc-per-node 2 " in out and out.strip().endswith("device=cpu"), out
