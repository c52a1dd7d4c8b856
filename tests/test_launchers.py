"""The launchers (examples/megatron/*.sh, slurm.sbatch), run with stand-ins that record the
torchrun command instead of training.

- The process count: the GPUs the job may use, not every GPU on the node. `nvidia-smi` lists
  every GPU whatever CUDA_VISIBLE_DEVICES says, so a job given two of eight GPUs would start
  eight ranks.
- Run from any directory: relative paths are the user's (the launchers stay in the user's
  directory, MODEL / TEACHER / DATA / OUTPUT_DIR arrive absolute), the shipped configs are
  found from anywhere.
- Multi-node: NNODES / NODE_RANK / MASTER_ADDR / MASTER_PORT become torchrun's flags, and
  slurm.sbatch starts one launcher per node with that node's NODE_RANK.

The stand-in interpreter prints the command it was given (one line) and appends its working
directory and argv to `calls` beside it; stand-in `nvidia-smi` (four GPUs), `srun` and
`scontrol` do what Slurm's would for a 3-node allocation.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "examples" / "megatron"
RECIPES = {"gkd.sh": "gkd_qwen2.5_0.5b_from_7b.yaml", "opd_rl.sh": "opd_rl_qwen2.5_0.5b_from_7b.yaml",
           "opsd.sh": "opsd_qwen2.5_1.5b.yaml"}

SRUN = """#!/bin/bash
# Slurm's srun for one task per node: the command once per node, SLURM_NODEID set on each.
printf '%s\\n' "$*" >> "$(dirname "$0")/srun_args"
while [[ "$1" == -* ]]; do shift; done
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" || exit; done
"""
SCONTROL = """#!/bin/bash
# `show hostnames LIST`: gpu[07-09] -> gpu07 gpu08 gpu09; `show job ID`: Command= as SUBMITTED says.
case "$1 $2" in
    # still writing after `head -n1` has gone (SIGPIPE), as a real one may be
    "show hostnames") [[ "$3" == "gpu[07-09]" ]] || exit 1; echo gpu07; sleep 0.2; printf 'gpu08\\ngpu09\\n' ;;
    "show job") printf 'JobId=%s JobName=megatron-opd\\n   Command=%s\\n   WorkDir=/somewhere\\n' "$3" "${SUBMITTED:-}" ;;
    *) exit 1 ;;
esac
"""


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: NVIDIA H200 (UUID: GPU-{i})'\n" for i in range(4)))
    python = bin_dir / "python-stand-in"
    python.write_text('#!/bin/sh\necho "$@" "device=${MEGATRON_OPD_DEVICE:-}"\n'
                      '{ printf "cwd=%s\\n" "$PWD"; printf "arg=%s\\n" "$@"; echo end; } >> "$(dirname "$0")/calls"\n')
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "scontrol").write_text(SCONTROL)
    for file in bin_dir.iterdir():
        file.chmod(0o755)
    return bin_dir


def _env(fake_bin: Path, with_smi: bool = True, **env) -> dict:
    path = f"{fake_bin}:{os.environ['PATH']}" if with_smi else "/usr/bin:/bin"
    drop = ("CUDA_VISIBLE_DEVICES", "NPROC", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "MODEL",
            "TEACHER", "DATA", "OUTPUT_DIR", "TP", "PP", "MEGATRON_OPD_ROOT")
    base = {key: value for key, value in os.environ.items() if key not in drop and not key.startswith("SLURM_")}
    return {**base, "PATH": path, "PYTHON": str(fake_bin / "python-stand-in"), **env}


def _run(fake_bin: Path, script: Path | str, *args: str, cwd: Path | None = None, with_smi: bool = True,
         check: bool = True, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=cwd,
                            env=_env(fake_bin, with_smi, **env))
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


def _launch(fake_bin: Path, with_smi: bool = True, **env) -> str:
    return _run(fake_bin, LAUNCHERS / "train.sh", "c.yaml", with_smi=with_smi, **env).stdout


def _calls(fake_bin: Path) -> list[tuple[Path, list[str]]]:
    """(working directory, argv) of each run of the stand-in interpreter."""
    calls, cwd, argv = [], None, []
    for line in (fake_bin / "calls").read_text().splitlines():
        if line == "end":
            calls.append((cwd, argv))
            cwd, argv = None, []
        elif line.startswith("cwd="):
            cwd = Path(line[len("cwd="):])
        else:
            argv.append(line[len("arg="):])
    return calls


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def _override(argv: list[str], key: str) -> str:
    found = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{key}=")]
    assert len(found) == 1, f"{key}= in {argv}"
    return found[0]


# ----------------------------------------------------------------------------- process count


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


# ----------------------------------------------------------------------------- from any directory


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's directory outside the repository: a model, data files and a config of theirs."""
    work = tmp_path / "work"
    (work / "models" / "student").mkdir(parents=True)
    (work / "data").mkdir()
    for name in ("train.jsonl", "more.jsonl", "val.jsonl"):
        (work / "data" / name).write_text('{"prompt": "1+1=", "completion": "2"}\n')
    (work / "mine.yaml").write_text("model: models/student\n")
    return work


def test_relative_paths_are_the_users(fake_bin, user_dir):
    _run(fake_bin, LAUNCHERS / "train.sh", "mine.yaml", "data.val_dataset=[data/val.jsonl]", cwd=user_dir,
         MODEL="models/student", TEACHER="null", DATA="data/train.jsonl,./data/more.jsonl", OUTPUT_DIR="runs/gkd")
    [(cwd, argv)] = _calls(fake_bin)
    assert cwd == user_dir  # the trainer runs where the user stands: their key=value paths hold
    assert _flag(argv, "--config") == str(user_dir / "mine.yaml")
    assert _override(argv, "model") == str(user_dir / "models" / "student")
    assert _override(argv, "teacher_model") == "null"  # not a path here: passed as it is
    data = _override(argv, "data.dataset")
    assert data == f"[{user_dir / 'data' / 'train.jsonl'},{user_dir / 'data' / 'more.jsonl'}]"
    assert _override(argv, "training.output_dir") == str(user_dir / "runs" / "gkd")
    for path in (_flag(argv, "--config"), _override(argv, "model"), *data[1:-1].split(",")):
        assert Path(path).is_absolute() and Path(path).exists(), path
    assert _override(argv, "data.val_dataset") == "[data/val.jsonl]" and (cwd / "data" / "val.jsonl").exists()


@pytest.mark.parametrize("launcher", sorted(RECIPES))
def test_recipes_are_found_from_anywhere(fake_bin, user_dir, launcher):
    # The default recipe, by the script's own path given relative to the user's directory.
    script = os.path.relpath(LAUNCHERS / launcher, user_dir)
    _run(fake_bin, script, "training.train_iters=1", cwd=user_dir, MODEL="models/student")
    # The user's own config, relative to their directory.
    _run(fake_bin, script, "mine.yaml", cwd=user_dir)
    [(cwd, default), (_, mine)] = _calls(fake_bin)
    assert cwd == user_dir
    assert _flag(default, "--config") == str(REPO / "configs" / RECIPES[launcher])
    assert "training.train_iters=1" in default and _override(default, "model") == str(user_dir / "models/student")
    assert _flag(mine, "--config") == str(user_dir / "mine.yaml")


def test_repository_config_path_from_anywhere(fake_bin, tmp_path):
    _run(fake_bin, LAUNCHERS / "train.sh", "configs/opsd_qwen2.5_1.5b.yaml", cwd=tmp_path)
    [(_, argv)] = _calls(fake_bin)
    assert _flag(argv, "--config") == str(REPO / "configs" / "opsd_qwen2.5_1.5b.yaml")


# ----------------------------------------------------------------------------- multi-node


def test_one_node_is_standalone(fake_bin):
    _launch(fake_bin)
    [(_, argv)] = _calls(fake_bin)
    assert "--standalone" in argv and "--nnodes" not in argv and "--master-addr" not in argv


def test_multi_node_environment_becomes_torchrun_flags(fake_bin):
    _launch(fake_bin, NNODES="4", NODE_RANK="2", MASTER_ADDR="node0.cluster", MASTER_PORT="31337")
    _launch(fake_bin, NNODES="2", NODE_RANK="0", MASTER_ADDR="10.0.0.1")
    [(_, given), (_, default_port)] = _calls(fake_bin)
    assert "--standalone" not in given
    assert [_flag(given, flag) for flag in ("--nnodes", "--node-rank", "--master-addr", "--master-port",
                                            "--nproc-per-node")] == ["4", "2", "node0.cluster", "31337", "4"]
    # torchrun's flags, before the trainer's module
    assert given[:2] == ["-m", "torch.distributed.run"] and given.index("--nnodes") < given.index("megatron_opd.train")
    assert _flag(default_port, "--master-port") == "29500" and _flag(default_port, "--node-rank") == "0"


@pytest.mark.parametrize("missing", ["NODE_RANK", "MASTER_ADDR"])
def test_multi_node_needs_node_rank_and_master_addr(fake_bin, missing):
    env = {key: value for key, value in {"NODE_RANK": "1", "MASTER_ADDR": "node0"}.items() if key != missing}
    result = _run(fake_bin, LAUNCHERS / "train.sh", "c.yaml", check=False, NNODES="2", **env)
    assert result.returncode != 0 and missing in result.stderr and not (fake_bin / "calls").exists()


# ----------------------------------------------------------------------------- Slurm

SLURM_ENV = {"SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_NNODES": "3",
             "SLURM_NODEID": "0"}  # the batch step's own node: srun's tasks each have theirs


def test_sbatch_parses():
    subprocess.run(["bash", "-n", str(LAUNCHERS / "slurm.sbatch")], check=True)
    head = (LAUNCHERS / "slurm.sbatch").read_text().split("\nset ")[0]
    for option in ("--nodes=", "--ntasks-per-node=1", "--gpus-per-node="):
        assert f"#SBATCH {option}" in head


def _check_slurm_run(fake_bin: Path, cwd: Path, config: str, extra: list[str]) -> None:
    calls = _calls(fake_bin)
    assert [_flag(argv, "--node-rank") for _, argv in calls] == ["0", "1", "2"]
    for call_cwd, argv in calls:
        assert call_cwd == cwd
        assert _flag(argv, "--nnodes") == "3" and _flag(argv, "--master-addr") == "gpu07"
        assert _flag(argv, "--master-port") == str(20000 + 12345 % 20000)
        assert _flag(argv, "--nproc-per-node") == "4" and "--standalone" not in argv
        assert _flag(argv, "--config") == config and argv[len(argv) - len(extra):] == extra
    assert "--ntasks-per-node=1" in (fake_bin / "srun_args").read_text()


def test_sbatch_runs_one_launcher_per_node(fake_bin, user_dir):
    _run(fake_bin, LAUNCHERS / "slurm.sbatch", "opd_rl.sh", "num_generations=2", cwd=user_dir,
         MODEL="models/student", **SLURM_ENV)
    _check_slurm_run(fake_bin, user_dir, str(REPO / "configs" / RECIPES["opd_rl.sh"]), ["num_generations=2"])
    assert all(_override(argv, "model") == str(user_dir / "models" / "student") for _, argv in _calls(fake_bin))


def test_sbatch_default_launcher_and_user_config(fake_bin, user_dir):
    _run(fake_bin, LAUNCHERS / "slurm.sbatch", "mine.yaml", cwd=user_dir, **SLURM_ENV)
    _check_slurm_run(fake_bin, user_dir, str(user_dir / "mine.yaml"), [])


@pytest.mark.parametrize("how", ["scontrol", "MEGATRON_OPD_ROOT"])
def test_sbatch_spool_copy_finds_the_launchers(fake_bin, user_dir, tmp_path, how):
    """sbatch runs a copy of the script (slurmd's spool directory), not the file in the repository."""
    spool = tmp_path / "spool" / "job12345"
    spool.mkdir(parents=True)
    copy = spool / "slurm_script"
    shutil.copy(LAUNCHERS / "slurm.sbatch", copy)
    env = {"SUBMITTED": str(LAUNCHERS / "slurm.sbatch")} if how == "scontrol" else {"MEGATRON_OPD_ROOT": str(REPO)}
    _run(fake_bin, copy, "gkd.sh", cwd=user_dir, **SLURM_ENV, **env)
    _check_slurm_run(fake_bin, user_dir, str(REPO / "configs" / RECIPES["gkd.sh"]), [])
    # Neither: a clear error, nothing started.
    (fake_bin / "calls").unlink()
    result = _run(fake_bin, copy, "gkd.sh", cwd=user_dir, check=False, **SLURM_ENV)
    assert result.returncode == 2 and "MEGATRON_OPD_ROOT" in result.stderr and not (fake_bin / "calls").exists()


# ----------------------------------------------------------------------------- lint


SCRIPTS = sorted(LAUNCHERS.glob("*.sh")) + [LAUNCHERS / "slurm.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda path: path.name)
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck():
    result = subprocess.run(["shellcheck", "--shell=bash", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
