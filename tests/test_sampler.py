"""MegatronSampler: greedy generation equals HF transformers' `generate`; seeded sampling gives
the same ids on every rank and at every layout (TP=1, TP=2, PP=2), with and without the KV cache.

References are independent of the code under test: HF's own greedy decoding of the same
checkpoint (one prompt at a time, so its padding plays no part), and for sampling the
TP=1 run of the same seeds. Prompts have different lengths (3, 9, 5 tokens) so the
right-padded batch, prompt forcing and the per-row stop are exercised; prompt 0 stops first,
so the finished-row compaction of the batch and its KV cache runs in every layout.
"""

from __future__ import annotations

import pytest
import torch

from megatron_opd.config import ParallelConfig
from megatron_opd.rollout import SamplingParams
from megatron_opd.testing import run_distributed
from tests.hf_models import VOCAB, make_hf_model

PROMPTS = [[5, 17, 42], [7, 7, 8, 100, 250, 3, 9, 11, 12], [299, 0, 1, 2, 64]]
MAX_NEW = 12
SEEDS = [11, 12, 13]
LAYOUTS = {"tp1": (1, 1, 1), "tp2": (2, 2, 1), "pp2": (2, 1, 2)}  # world, tp, pp
FAMILIES = ("qwen2", "llama3.1")  # tied head + QKV bias; untied head + llama3 RoPE


def hf_greedy(directory, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=max_new, eos_token_id=eos, pad_token_id=0,
                            min_new_tokens=0)
    return output[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Per family: the HF directory, an EOS id that greedy decoding of prompt 0 emits at
    its 4th step, and HF's greedy completions of every prompt with that EOS."""
    root = tmp_path_factory.mktemp("sampler")
    result = {}
    for index, family in enumerate(FAMILIES):
        directory = make_hf_model(family, root / family, seed=20 + index)
        eos = hf_greedy(directory, PROMPTS[0], 4, None)[3]
        references = [hf_greedy(directory, prompt, MAX_NEW, eos) for prompt in PROMPTS]
        result[family] = {"dir": directory, "eos": eos, "hf": references}
    return result


def generate_on_rank(models: dict, tp: int, pp: int) -> dict:
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.rollout import MegatronSampler
    from megatron_opd.runtime import initialize_runtime

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp))
    report = {}
    for family, info in models.items():
        model = load_pretrained(info["dir"], runtime, role="teacher")
        greedy = SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0, eos_token_ids=(info["eos"],))
        sampled = SamplingParams(max_new_tokens=MAX_NEW, temperature=4.0, eos_token_ids=(info["eos"],))
        top5 = SamplingParams(max_new_tokens=MAX_NEW, temperature=4.0, top_k=5)
        entry = {}
        for cache in (True, False):
            sampler = MegatronSampler(model, VOCAB, use_kv_cache=cache)
            rollout = sampler.generate(PROMPTS, greedy)
            entry[f"greedy_kv{cache}"] = (rollout.completions, rollout.finished)
            entry[f"sampled_kv{cache}"] = sampler.generate(PROMPTS, sampled, SEEDS).completions
            entry[f"top5_kv{cache}"] = sampler.generate(PROMPTS, top5, SEEDS).completions
        # Finished rows leave the batch (and the KV cache) by default; keeping them changes no id.
        entry["sampled_uncompacted"] = MegatronSampler(model, VOCAB, compact_finished=False).generate(
            PROMPTS, sampled, SEEDS).completions
        sampler = MegatronSampler(model, VOCAB)
        # A row's sample depends on its seed, not on the rows sharing its batch.
        entry["row1_alone"] = sampler.generate(PROMPTS[1:2], sampled, SEEDS[1:2]).completions[0]
        entry["other_seeds"] = sampler.generate(PROMPTS, sampled, [s + 100 for s in SEEDS]).completions
        report[family] = entry
    return report


@pytest.fixture(scope="module")
def runs(models):
    return {name: run_distributed(generate_on_rank, world, models, tp, pp, timeout=300)
            for name, (world, tp, pp) in LAYOUTS.items()}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_equals_hf_generate(models, runs, family, layout):
    hf = models[family]["hf"]
    assert any(len(completion) < MAX_NEW for completion in hf), "EOS never stopped HF: the test lost its stop case"
    for rank_report in runs[layout]:
        for cache in (True, False):
            completions, finished = rank_report[family][f"greedy_kv{cache}"]
            assert completions == hf, f"rank output (kv cache {cache}) differs from HF generate"
            assert finished == [completion[-1] == models[family]["eos"] and len(completion) <= MAX_NEW
                                for completion in hf]


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_identical_across_ranks_layouts_and_cache(runs, family):
    reference = runs["tp1"][0][family]
    assert reference["sampled_kvTrue"] != reference["greedy_kvTrue"][0], "sampling gave the greedy path"
    assert reference["other_seeds"] != reference["sampled_kvTrue"], "the seeds do not change the samples"
    for layout, reports in runs.items():
        for rank, report in enumerate(reports):
            entry = report[family]
            for key in ("sampled", "top5"):
                for cache in (True, False):
                    assert entry[f"{key}_kv{cache}"] == reference[f"{key}_kvTrue"], (layout, rank, key, cache)
            assert entry["row1_alone"] == reference["sampled_kvTrue"][1], (layout, rank)
            assert entry["sampled_uncompacted"] == reference["sampled_kvTrue"], (layout, rank)


def check_errors_on_rank(directory) -> list[str]:
    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.rollout import MegatronSampler
    from megatron_opd.runtime import initialize_runtime

    model = load_pretrained(directory, initialize_runtime(ParallelConfig()), role="teacher")
    sampler = MegatronSampler(model, VOCAB)
    messages = []
    for prompts, params, seeds in (
        ([[1, 2], []], SamplingParams(4, temperature=0.0), None),
        ([[1, VOCAB]], SamplingParams(4, temperature=0.0), None),
        ([[1, 2]], SamplingParams(4, temperature=1.0), None),
        ([[1, 2]], SamplingParams(4, temperature=1.0, top_k=VOCAB + 1), [0]),
    ):
        try:
            sampler.generate(prompts, params, seeds)
            messages.append("no error")
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_requests_are_refused(models):
    messages = run_distributed(check_errors_on_rank, 1, models["qwen2"]["dir"])[0]
    assert "prompt 1 is empty" in messages[0]
    assert "outside [0, 300)" in messages[1] and "300" in messages[1]
    assert "needs one seed per prompt" in messages[2]
    assert "top_k=301" in messages[3]


@pytest.mark.parametrize("kwargs, field", [
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 4, "temperature": -1.0}, "temperature"),
    ({"max_new_tokens": 4, "top_k": 0}, "top_k"),
])
def test_sampling_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def heartbeat_on_rank(directory) -> list[str]:
    import contextlib
    import io

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.rollout import MegatronSampler
    from megatron_opd.runtime import initialize_runtime

    model = load_pretrained(directory, initialize_runtime(ParallelConfig()), role="teacher")
    lines = []
    for interval in (0.0, 3600.0):
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            MegatronSampler(model, VOCAB, label="teacher", progress_interval_s=interval).generate(
                PROMPTS, SamplingParams(max_new_tokens=MAX_NEW, temperature=0.0))
        lines.append(stderr.getvalue())
    return lines


def test_long_sampling_reports_its_progress(models):
    """A line per interval while sampling (tokens so far, responses finished), none for a
    batch shorter than the interval."""
    every_step, quiet = run_distributed(heartbeat_on_rank, 1, models["qwen2"]["dir"])[0]
    lines = every_step.splitlines()
    assert lines and all(line.startswith("sampling (teacher): ") for line in lines), every_step
    assert f"1/{MAX_NEW} tokens, 0/3 responses finished" in lines[0]
    assert quiet == ""
