"""A tiny GKD setup written to disk: student and teacher HF models sharing a tokenizer, and data.

The task is a deterministic word-level sequence (each completion continues its prompt by
a fixed rule), so a teacher can be made to know it and a student can learn it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests.hf_models import VOCAB, make_hf_model, make_tokenizer

_RULE_STEP = 7


def completion_for(prompt: list[int]) -> list[int]:
    """Word ids that continue `prompt`: the next four of an arithmetic progression mod the vocab."""
    start = prompt[-1]
    return [1 + (start + _RULE_STEP * (i + 1)) % (VOCAB - 2) for i in range(4)]


def write_dataset(path: Path, rows: int, seed: int, lengths=(3, 9)) -> Path:
    """JSONL prompt/completion rows of unequal lengths (raw text of word tokens)."""
    generator = torch.Generator().manual_seed(seed)
    with open(path, "w") as handle:
        for _ in range(rows):
            length = int(torch.randint(lengths[0], lengths[1], (1,), generator=generator))
            prompt = torch.randint(1, VOCAB - 2, (length,), generator=generator).tolist()
            completion = completion_for(prompt)[: 1 + int(torch.randint(0, 4, (1,), generator=generator))]
            handle.write(json.dumps({"prompt": " ".join(f"w{i}" for i in prompt),
                                     "completion": " ".join(f"w{i}" for i in completion)}) + "\n")
    return path


def make_gkd_setup(root: Path, student_family: str = "qwen2", teacher_family: str = "llama2",
                   student_fields: dict | None = None, teacher_fields: dict | None = None,
                   **config_fields) -> dict:
    """`config_fields`: overrides of both models' configs (e.g. head counts);
    `student_fields` / `teacher_fields`: of one model only (a teacher of another shape)."""
    root.mkdir(parents=True, exist_ok=True)
    student = make_hf_model(student_family, root / "student", seed=1, **{**config_fields, **(student_fields or {})})
    teacher = make_hf_model(teacher_family, root / "teacher", seed=2, **{**config_fields, **(teacher_fields or {})})
    # Its own directory: next to a model's config.json, transformers 5 would load the
    # model family's tokenizer class instead of this word-level one.
    make_tokenizer(root / "tokenizer")
    return {"student": str(student), "teacher": str(teacher), "tokenizer": str(root / "tokenizer"),
            "train": str(write_dataset(root / "train.jsonl", 64, seed=3)),
            "val": str(write_dataset(root / "val.jsonl", 16, seed=4))}


def overrides(setup: dict, output_dir: Path, **fields) -> list[str]:
    """key=value overrides of a GKD run on `setup` (fp32, off-policy, raw prompt format)."""
    values = {
        "model": setup["student"], "teacher_model": setup["teacher"], "lmbda": 0, "beta": 0.5,
        "temperature": 1.0, "data.dataset": f"[{setup['train']}]", "data.val_dataset": f"[{setup['val']}]",
        "data.prompt_format": "raw", "data.tokenizer": setup["tokenizer"], "data.max_length": 32, "training.output_dir": str(output_dir),
        "training.train_iters": 2, "training.micro_batch_size": 2, "training.global_batch_size": 8,
        "training.precision": "fp32", "training.tensorboard": False, "training.export_hf": False,
        "optimizer.lr": 1e-3, "optimizer.lr_decay_style": "constant", "optimizer.clip_grad": 0.0,
        **fields,
    }
    return [f"{key}={value}" for key, value in values.items()]
