"""Every shell command in README.md's ```bash blocks runs as written, or is on an explicit skip list.

Commands run in a workspace that looks like the repository root (configs/, examples/, tools/
linked in) and holds tiny models and data under the names the README uses
(`Qwen2.5-0.5B-Instruct`, `train.jsonl`, `val.jsonl`, ...). Only placeholders are
substituted: `MODEL=...`, `/models/teacher`, `X.yaml` (a tiny config), `NPROC=8` (2 CPU
ranks), port 8000 (a free port); training commands get `key=value` overrides appended
that point the recipes at the tiny models and shorten them to 2 steps.

A README command that is neither run here nor in SKIPPED fails
`test_every_readme_command_is_run_or_skipped`, so none is silently left out.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def entry_point() -> tuple[str, str]:
    """(module, function) of the `megatron-opd` script as pyproject.toml declares it."""
    text = (ROOT / "pyproject.toml").read_text()
    return tuple(re.search(r'^megatron-opd\s*=\s*"([\w.]+):(\w+)"', text, flags=re.M).groups())

# Not run here, with the reason. In README order; the test checks this list against the README.
SKIPPED = {
    "make quickstart": "creates .venv and installs; the quickstart itself is tests/test_quickstart.py",
    "make test": "creates .venv and runs this test suite",
    "make demo-opd-rl": "installs; the demo itself is tests/test_demos.py",
    "make demo-opsd": "installs; the demo itself is tests/test_demos.py",
    "vllm serve /models/Qwen2.5-7B-Instruct --max-logprobs 20 --port 8000": "a 7B model on a GPU; vLLM's CPU "
        "build serves tiny teachers in tests/test_vllm_teacher.py (`make test-vllm`), and our server, which "
        "speaks its API, is the next command",
    "python -m vllm.entrypoints.launchers.api_server.entry --model /models/teacher --dtype float32 --enforce-eager "
    "--max-logprobs 20 --port 8000": "needs vLLM's CPU build (`make vllm-setup`): tests/test_vllm_teacher.py runs "
        "this module as the teacher (`make test-vllm`)",
    "make demo-multi-teacher": "installs; the demo itself is tests/test_demo_multi_teacher.py (slow)",
    "NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 NPROC=8 OUTPUT_DIR=/shared/runs/gkd "
    "bash examples/megatron/train.sh configs/gkd_qwen2.5_0.5b_from_7b.yaml": "needs 2 nodes: tests/test_launchers.py "
        "checks the torchrun flags the launcher builds from these variables",
    "torchrun --nnodes 2 --node-rank 0 --master-addr node0 --master-port 29500 --nproc-per-node 8 -m megatron_opd.train "
    "--config configs/gkd_qwen2.5_0.5b_from_7b.yaml training.output_dir=/shared/runs/gkd": "needs 2 nodes "
        "(what the previous command runs)",
    "MODEL=... TEACHER=... DATA=train.jsonl OUTPUT_DIR=/shared/runs/gkd sbatch --nodes=4 --gpus-per-node=8 "
    "examples/megatron/slurm.sbatch gkd.sh": "needs a Slurm cluster: tests/test_launchers.py runs the script with "
        "stand-in srun and scontrol",
    "python -m megatron_opd.train --print-config --config configs/gkd_qwen2.5_0.5b_from_7b.yaml": "prints the "
        "config; tests/test_config_describe.py renders every shipped recipe and loads the output back",
    "python -m megatron_opd.train --config run.yaml training.train_iters=2000 optimizer.lr=5e-6": "a resume of "
        "a user's run: tests/test_resume_changes.py resumes with train_iters and lr changed",
    "python -m megatron_opd.train --config run.yaml data.dataset=[more.jsonl] "
    "training.resume_allow_changes=[data.dataset]": "a resume of a user's run: tests/test_resume_changes.py "
        "resumes with changes refused, then allowed",
    "torchrun --standalone --nproc-per-node 2 tools/convert_checkpoint.py hf-to-megatron --hf-path Qwen3-30B-A3B "
    "--out ckpt/qwen3-30b-a3b --ep 2": "a 30B model: tests/test_moe_convert.py converts tiny Qwen3-MoE, Qwen2-MoE "
        "and Mixtral models across EP layouts",
    "python -m venv .venv && . .venv/bin/activate": "creates an environment",
    "pip install torch": "installs packages",
    'pip install -e ".[gpu,vllm]"': "installs packages",
    "MEGATRON_OPD_DEVICE=cuda torchrun --nproc-per-node 4 tools/bench_train.py --tp 2 --pp 2": "needs 4 CUDA GPUs",
    "pip install trl accelerate --no-deps": "installs packages (TRL: a benchmark dependency, not a test one)",
    "python tools/bench_train.py --against trl --steps 15 --rounds 3 --lmbdas 0,0.5": "needs TRL; its inputs "
        "(the same token ids on both sides) and report arithmetic are tests/test_bench_against_trl.py",
    "python tools/bench_train.py --against trl --preset qwen2.5-0.5b-from-1.5b --lmbdas 0 --batch 2 --micro-batch 1 "
    "--steps 2 --rounds 1 --gradient-checkpointing on": "needs TRL and about 20 GiB (2 B parameters in fp32 with "
        "Adam on each side) for half an hour on 2 CPU cores, run by hand: its numbers are above",
    "torchrun --standalone --nproc-per-node 2 tools/bench_train.py --preset qwen2.5-0.5b-from-1.5b --tp 2 "
    "--precision bf16 --batch 2 --micro-batch 1 --steps 1 --no-sampler": "a benchmark at real shapes (2 x 10 GiB, "
        "about 10 minutes on 2 CPU cores), run by hand: its numbers are in the README",
}

# Groups of README commands run in README order by one test each; slow ones only with `-m slow`.
GROUPS = {
    "gkd_torchrun": ("torchrun --standalone --nproc-per-node 2 -m megatron_opd.train",),
    "gkd_one_process": ("python -m megatron_opd.train --config configs/gkd_",),
    "gkd_launcher": ("bash examples/megatron/gkd.sh",),
    "served_teacher": ("megatron-opd serve-teacher", "python -m megatron_opd.train --config X.yaml"),
    "teacher_server_script": ("bash examples/megatron/teacher_server.sh",),
    "opd_rl_launcher": ("bash examples/megatron/opd_rl.sh",),
    "opsd_launcher": ("bash examples/megatron/opsd.sh",),
    "convert": ("megatron-opd convert", "torchrun --standalone --nproc-per-node 4 tools/convert_checkpoint.py"),
}
# Longer runs, in `make test-slow`: each is also covered by faster tests (test_gkd_trainer,
# test_server_teacher, test_opd_rl_trainer, test_convert), here only as the README writes it.
SLOW = {"gkd_torchrun", "teacher_server_script", "opd_rl_launcher", "opsd_launcher", "convert", "served_teacher"}

# Appended to every training command: tiny inputs, 2 short steps, no HF export.
SHORT = ["data.tokenizer=tiny/tokenizer", "data.prompt_format=raw", "data.max_length=32",
         "max_completion_length=4", "training.train_iters=2", "training.micro_batch_size=2",
         "training.global_batch_size=8", "training.eval_iters=1", "training.export_hf=false",
         "training.tensorboard=false"]
# And to commands that take a recipe's /models and /data paths as they are.
TINY_PATHS = ["model=tiny/student", "teacher_model=tiny/teacher", "data.dataset=[train.jsonl]",
              "data.val_dataset=[val.jsonl]"]


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks: continuations joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M):
        for line in re.sub(r"\\\n", " ", block).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            if line.strip():
                commands.append(" ".join(line.split()))
    return commands


def group_of(command: str) -> str | None:
    found = [name for name, prefixes in GROUPS.items() if any(command.startswith(p) or f" {p}" in command
                                                               for p in prefixes)]
    assert len(found) <= 1, f"{command!r} matches groups {found}"
    return found[0] if found else None


def test_every_readme_command_is_run_or_skipped():
    commands = readme_commands()
    assert [command for command in commands if command in SKIPPED] == list(SKIPPED), \
        "SKIPPED must list exactly the README's skipped commands, in README order"
    unplaced = [command for command in commands if command not in SKIPPED and group_of(command) is None]
    assert unplaced == [], f"README commands neither run by this test nor skipped: {unplaced}"
    assert {group_of(command) for command in commands} - {None} == set(GROUPS), "a group runs no command"


# ----------------------------------------------------------------------------- the workspace


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    import shutil

    from tests.gkd_setup import make_gkd_setup
    from tests.hf_models import make_hf_model

    ws = tmp_path_factory.mktemp("readme")
    for name in ("configs", "examples", "tools"):
        (ws / name).symlink_to(ROOT / name)
    setup = make_gkd_setup(ws / "tiny")
    for name in ("train", "val"):
        shutil.copy(setup[name], ws / f"{name}.jsonl")
    rows = [json.loads(line) for line in open(setup["train"])]
    with open(ws / "prompts.jsonl", "w") as prompts, open(ws / "opsd.jsonl", "w") as opsd:
        for row in rows:
            prompts.write(json.dumps({"prompt": row["prompt"]}) + "\n")
            # OPSD's privileged context: the answer before the prompt.
            opsd.write(json.dumps({"prompt": row["prompt"],
                                   "teacher_prompt": f"{row['completion']} w299 {row['prompt']}"}) + "\n")
    # The served teacher: a model directory with its tokenizer beside it, as a real one has.
    shutil.copytree(setup["teacher"], ws / "tiny" / "served_teacher")
    for path in Path(setup["tokenizer"]).iterdir():
        shutil.copy(path, ws / "tiny" / "served_teacher" / path.name)
    make_hf_model("qwen2", ws / "Qwen2.5-0.5B-Instruct", with_tokenizer=True)
    (ws / "X.yaml").write_text(
        "model: tiny/student\nbeta: 0.5\nlmbda: 0\n"
        "data:\n  dataset: [train.jsonl]\n  val_dataset: [val.jsonl]\n")
    # `megatron-opd` as pyproject.toml declares it (the venv's script may predate a move).
    module, function = entry_point()
    (ws / "bin").mkdir()
    script = ws / "bin" / "megatron-opd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -c "import sys; from {module} import {function}; '
                      f"sys.argv[0] = 'megatron-opd'; sys.exit({function}())\" \"$@\"\n")
    script.chmod(0o755)
    return ws


def environment(ws: Path, **extra: str) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    # `python`, `torchrun` from this interpreter's environment; our `megatron-opd` first.
    env["PATH"] = os.pathsep.join([str(ws / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def substituted(command: str, port: int) -> str:
    """The README command with its placeholders filled in for the workspace."""
    for placeholder, value in (("MODEL=...", "MODEL=tiny/student"), ("TEACHER=...", "TEACHER=tiny/teacher"),
                               ("DATA=...", "DATA=train.jsonl"), ("/models/teacher", "tiny/served_teacher"),
                               ("NPROC=8", "NPROC=2"), ("127.0.0.1:8000", f"127.0.0.1:{port}"),
                               ("--port 8000", f"--port {port}")):
        command = command.replace(placeholder, value)
    assert "..." not in command and "/models/" not in command and "/data/" not in command, command
    return command


def training_overrides(command: str, name: str) -> list[str]:
    if "megatron_opd.train" not in command and "examples/megatron/" not in command:
        return []
    extra = [*SHORT, f"training.output_dir=outputs/{name}"]
    if "configs/" in command:  # the recipe's own /models and /data paths
        extra += TINY_PATHS
    if "opd_rl" in command:
        extra += ["num_generations=2"]
    return extra


def run(command: str, ws: Path, env: dict, timeout: float = 400) -> None:
    completed = subprocess.run(["bash", "-c", command], cwd=ws, env=env, capture_output=True, text=True,
                               timeout=timeout)
    assert completed.returncode == 0, f"{command}\nexit {completed.returncode}\n" + \
        completed.stdout[-3000:] + completed.stderr[-5000:]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, f"the server exited with {server.returncode}"
        try:
            urllib.request.urlopen(url + "/health", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"no /health from {url} after {timeout:.0f}s")


@pytest.mark.parametrize("group", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                   for name in GROUPS])
def test_readme_commands_run(group, workspace, tmp_path):
    commands = [command for command in readme_commands() if group_of(command) == group]
    assert commands, f"no README command in group {group}"
    port = free_port()
    env = environment(workspace, PORT=str(port))
    server = None
    try:
        for index, command in enumerate(commands):
            line = " ".join([substituted(command, port), *training_overrides(command, f"{group}{index}")])
            if "serve-teacher" in command:  # runs until stopped: in the background, for the next command
                log = open(tmp_path / "server.log", "w")
                server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=workspace, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True)
                wait_healthy(f"http://127.0.0.1:{port}", server)
            else:
                run(line, workspace, env)
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
