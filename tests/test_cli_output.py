"""What the commands print around their own output: nothing for `--help`, and one mode line
(device, ranks, threads, optional packages) when a command starts a runtime, instead of
Megatron-Core's import-time notices about missing Apex / Transformer Engine."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Megatron-Core's notices (megatron_opd/runtime/quiet.py lists where they come from).
NOTICE = re.compile(r"Apex|Transformer Engine|absl|UserWarning")


def entry_point() -> tuple[str, str]:
    """(module, function) of the `megatron-opd` script as pyproject.toml declares it."""
    text = (ROOT / "pyproject.toml").read_text()
    return tuple(re.search(r'^megatron-opd\s*=\s*"([\w.]+):(\w+)"', text, flags=re.M).groups())


def console_script() -> list[str]:
    """`megatron-opd` as pyproject.toml declares it (the installed script may predate a move)."""
    module, function = entry_point()
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def run(argv: list[str], timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items() if key != "PYTHONWARNINGS"}
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**environ, "MEGATRON_OPD_DEVICE": "cpu", **env})


HELP = {
    "megatron-opd": [],
    "megatron-opd convert": ["convert"],
    "megatron-opd train": ["train"],
    "megatron-opd serve-teacher": ["serve-teacher"],
    "megatron-opd cache-teacher": ["cache-teacher"],
    "python -m megatron_opd.train": ["-m", "megatron_opd.train"],
    "python -m megatron_opd.quickstart": ["-m", "megatron_opd.quickstart"],
    "python tools/convert_checkpoint.py": ["tools/convert_checkpoint.py"],
}


@pytest.mark.parametrize("command", list(HELP))
def test_help_prints_nothing_else(command):
    args = HELP[command]
    argv = [*console_script(), *args] if command.startswith("megatron-opd") else [sys.executable, *args]
    completed = run([*argv, "--help"])
    assert completed.returncode == 0 and "usage:" in completed.stdout, completed.stderr[-3000:]
    assert not NOTICE.search(completed.stderr), completed.stderr[-3000:]
    assert completed.stderr == "", completed.stderr[-3000:]


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_top_level_help_says_what_each_command_does(flag, capsys):
    from megatron_opd.commands import cli

    assert cli.main([flag]) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith("usage: megatron-opd ")
    for command in cli.COMMANDS:
        assert re.search(rf"^  {re.escape(command)}\s+\w.{{20,}}$", out, flags=re.M), (command, out)


@pytest.mark.parametrize("argv", [[], ["no-such-command"]])
def test_no_or_unknown_command_prints_the_help_on_stderr_and_exits_2(argv, capsys):
    from megatron_opd.commands import cli

    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(cli.help_text())
    assert ("unknown command 'no-such-command'" in err) == bool(argv)


def test_a_run_prints_one_mode_line_from_rank_zero(tmp_path):
    from tests.hf_models import make_hf_model

    hf = make_hf_model("llama2", tmp_path / "hf")
    module, function = entry_point()
    script = tmp_path / "megatron_opd_cli.py"
    # A main guard: dist-checkpointing's writer processes are spawned and re-import __main__.
    script.write_text(f"import sys\nfrom {module} import {function}\n"
                      f"if __name__ == '__main__':\n    sys.exit({function}())\n")
    completed = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                     str(script), "convert", "hf-to-megatron", "--hf-path", str(hf), "--out", str(tmp_path / "out"),
                     "--tp", "2"], timeout=400, OMP_NUM_THREADS="1")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert not re.search(r"(Apex|Transformer Engine and Apex) (is|are) not installed", completed.stderr)
    lines = [line for line in completed.stderr.splitlines() if line.startswith("megatron_opd:")]
    te = "no Transformer Engine" if importlib.util.find_spec("transformer_engine") is None \
        else r"Transformer Engine \S* ?\(unused on CPU\)"
    apex = "no Apex" if importlib.util.find_spec("amp_C") is None else r"Apex \S* ?\(unused on CPU\)"
    assert len(lines) == 1, completed.stderr[-3000:]
    assert re.fullmatch(rf"megatron_opd: CPU mode \(gloo\), 2 ranks, 1 intra-op thread per rank \(OMP_NUM_THREADS\), "
                        rf"{te}, {apex}; torch \S+, megatron-core \S+", lines[0]), lines[0]


def test_mode_line_is_printed_once_per_process_and_only_on_rank_zero(capsys, monkeypatch):
    from megatron_opd.runtime import quiet

    monkeypatch.setattr(quiet, "_printed", False)
    quiet.print_mode_line(1, "cpu", "gloo", 2, (1, "OMP_NUM_THREADS"))
    assert capsys.readouterr().err == ""
    for _ in range(2):
        quiet.print_mode_line(0, "cpu", "gloo", 2, (1, "OMP_NUM_THREADS"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "megatron_opd: CPU mode (gloo), 2 ranks, 1 intra-op thread per rank (OMP_NUM_THREADS), "), err


def test_engine_vllm_without_vllm_is_one_line_saying_how_to_install(tmp_path):
    """rollout.engine: vllm where vLLM does not import: exit 1, one line naming the fix, no traceback."""
    from tests.gkd_setup import make_gkd_setup, overrides

    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "vllm.py").write_text("raise ImportError('No module named vllm (blocked by the test)')\n")
    setup = make_gkd_setup(tmp_path / "setup")
    argv = overrides(setup, tmp_path / "out", lmbda=1.0, **{"rollout.engine": "vllm"})
    result = run([sys.executable, "-m", "megatron_opd.train", *argv], PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("megatron_opd.train: error: rollout.engine: vllm needs vLLM")
    assert "make vllm-setup" in lines[0] and '.[vllm]' in lines[0]
