"""tools/bench_against_trl.py (`bench_train.py --against trl`) without TRL: both sides must read
the same token ids, and the report's ratios must be per-round pairs."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load(name: str):
    sys.path.insert(0, str(REPO / "tools"))
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trl_side_reads_the_same_ids_as_our_raw_format(tmp_path):
    """TRL's ChatML collator formats the prompt with `add_generation_prompt=True` and the whole
    conversation without; tokenized, they must be our raw prompt ids and our prompt + completion
    + EOS ids, or the two sides would train on different tokens."""
    from transformers import AutoTokenizer

    from megatron_opd.data.encode import encode_row

    bench, bench_train = load("bench_against_trl"), load("bench_train")
    args = argparse.Namespace(workdir=tmp_path, family="llama", preset=None, student_experts=None,
                              **bench.QUICKSTART_SHAPES)
    args.tokenizer_vocab = args.vocab
    paths = bench_train.write_inputs(args)
    bench.write_trl_dataset(paths)
    ours_tokenizer = AutoTokenizer.from_pretrained(paths["tokenizer"])
    trl_tokenizer = AutoTokenizer.from_pretrained(paths["trl_tokenizer"])
    rows = [json.loads(line) for line in Path(paths["data"]).read_text().splitlines()]
    conversations = [json.loads(line)["messages"] for line in Path(paths["trl_data"]).read_text().splitlines()]
    assert len(rows) == len(conversations) > 0
    for row, messages in zip(rows, conversations):
        ours = encode_row(row, ours_tokenizer, "raw", allow_prompt_only=False)
        prompt_text = trl_tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full_text = trl_tokenizer.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        prompt_ids = trl_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full_ids = trl_tokenizer(full_text, add_special_tokens=False)["input_ids"]
        assert full_ids == list(ours.input_ids)
        assert prompt_ids == list(ours.input_ids[:ours.prompt_length])
        assert full_ids[-1] == ours_tokenizer.eos_token_id


def test_summary_ratio_pairs_each_round():
    bench = load("bench_against_trl")

    def run(tokens, cpu_s):
        return {"tokens": tokens, "cpu_s": cpu_s, "wall_s": cpu_s, "startup_s": 1.0, "peak_rss_gib": 1.0,
                "step_extra_gib": 0.5, "steps": 2, "window_cpu_s": cpu_s / 4}

    # Round 2 ran on a machine twice as loaded: both sides slowed, the pair's ratio stays 2.
    summary = bench.summarize({"ours": [run(100, 1.0), run(100, 2.0), run(100, 1.0)],
                               "trl": [run(100, 2.0), run(100, 4.0), run(100, 2.0)]})
    assert summary["ratio_tokens_per_cpu_s"] == 2.0
    assert summary["ours"]["tokens_per_cpu_s"] == 100.0 and summary["trl"]["tokens_per_cpu_s"] == 50.0
    assert summary["ours"]["tokens_per_step"] == 50.0
    # TRL's begin-to-end window is shown beside, never in the ratio.
    assert summary["trl"]["window_tokens_per_cpu_s"] == 200.0
