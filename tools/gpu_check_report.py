"""The report of the GPU acceptance checks (`gpu_vllm_check.py`, `gpu_train_check.py`): one
PASS / FAIL / INFO / SKIP / MISSING line per check as it happens, a summary line, JSON."""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from pathlib import Path
from typing import Optional


class Report:
    def __init__(self):
        self.lines: list[tuple[str, str, str]] = []

    def add(self, status: str, name: str, detail: str) -> None:
        self.lines.append((status, name, detail))
        print(f"{status} {name}: {detail}", flush=True)

    def check(self, ok: bool, name: str, detail: str) -> None:
        self.add("PASS" if ok else "FAIL", name, detail)

    @property
    def failed(self) -> list:
        return [line for line in self.lines if line[0] == "FAIL"]

    def rank_failure(self, name: str, error: Exception) -> None:
        """A check whose ranks raised or timed out: the last line here, the whole on stderr."""
        print(str(error), file=sys.stderr, flush=True)
        last = [line for line in str(error).strip().splitlines() if line.strip()][-1]
        self.add("FAIL", f"{name} run", f"a rank failed or timed out: {last[:300]} (full traceback on stderr)")

    def evaluation_failure(self, name: str, error: Exception) -> None:
        """A bug in evaluating one check: reported, so that it does not hide the other checks."""
        traceback.print_exc()
        self.add("FAIL", f"{name} evaluate", f"{type(error).__name__}: {error}")

    def finish(self, tool: str, skipped: list[str], what: str, json_path: Optional[Path], work: Path,
               keep: bool) -> int:
        """The summary line, the JSON file, `work` removed unless `keep`; the exit code (1 when
        a check failed, else 0)."""
        if keep:
            print(f"{tool}: models and outputs kept in {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
        passed = sum(1 for status, _, _ in self.lines if status == "PASS")
        print(f"{tool}: {passed} passed, {len(self.failed)} failed, {len(skipped)} {what} skipped"
              + (f" ({', '.join(skipped)})" if skipped else ""), flush=True)
        if json_path:
            json_path.write_text(json.dumps([dict(zip(("status", "check", "detail"), line)) for line in self.lines],
                                            indent=1) + "\n")
        return 1 if self.failed else 0


COMMON_MODULES = (("torch", True), ("megatron.core", True), ("transformers", True), ("safetensors", True),
                  ("transformer_engine", False))


def preflight(device: str, report: Report, modules: tuple[tuple[str, bool], ...], repo_module: str) -> dict:
    """Versions of `modules` (name, needed) and of CUDA; MISSING lines for what a check needs
    and is absent (a needed module, this repository's `repo_module`, a GPU with --device cuda)."""
    import importlib

    found = {}
    for module, needed in modules:
        try:
            found[module] = getattr(importlib.import_module(module), "__version__", "present")
        except Exception as error:  # noqa: BLE001 - a broken install raises more than ImportError
            found[module] = None
            report.add("MISSING" if needed else "INFO", module,
                       f"import failed ({type(error).__name__}: {error})" + ("" if needed else " (optional)"))
    try:
        import megatron_opd  # noqa: F401

        importlib.import_module(repo_module)
    except Exception as error:  # noqa: BLE001
        report.add("MISSING", "megatron_opd/tests", f"{type(error).__name__}: {error} (run from the repository)")
        found["megatron_opd"] = None
    if found.get("torch"):
        import torch

        found["cuda"] = torch.version.cuda
        found["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device == "cuda" and not found["gpus"]:
            report.add("MISSING", "gpu", f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    return found


def add_run_arguments(parser, timeout: float, budget: float, unit: str, kept: str) -> None:
    """The options both checks share: per-`unit` timeout, overall budget, JSON, keeping files."""
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds per {unit}")
    parser.add_argument("--budget", type=float, default=budget,
                        help=f"seconds for all of them: a later {unit} is skipped once it is spent")
    parser.add_argument("--json", type=Path, help="write every check line here")
    parser.add_argument("--keep", action="store_true", help=f"keep the {kept} (path printed)")


def selected(parser, text: str, known, kind: str) -> list[str]:
    """The comma-separated `text` as names, each one of `known` (else a usage error)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"unknown {kind}(s) {unknown}: one of {list(known)}")
    return names
