"""What GKD's loss does with opsd_clip, sft_alpha, seq_kd and sampled responses cut at
max_completion_length, against independent float64 references.

Loss level: `GKDLoss` on random hidden states and heads, against `tests.divergence_reference`
on the same logits in float64. Trainer level: one rank runs four 1-step jobs (SGD at lr=1,
no clipping: the update is minus the gradient); each step's loss, its terms and the update
of every weight that maps one to one onto an HF weight are compared with HF transformers
run in float64 on the tokens the step trained on (`tests.kd_hf_reference`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_opd.testing import run_distributed
from tests.divergence_reference import dense_divergence
from tests.gkd_setup import completion_for, make_gkd_setup, overrides
from tests.hf_models import VOCAB
from tests.kd_hf_reference import (
    assert_update_is,
    hf_model,
    run_trainer_jobs,
    step_reference,
)

SGD = {"optimizer.optimizer": "sgd", "optimizer.lr": 1.0, "optimizer.clip_grad": 0.0,
       "optimizer.lr_decay_style": "constant", "optimizer.weight_decay": 0.0,
       "optimizer.use_distributed_optimizer": "null", "training.micro_batch_size": 4, "training.train_iters": 1,
       "data.shuffle": "false"}
SFT_ALPHA = 0.5
MAX_COMPLETION = 3
OPSD_CLIP = 0.3
# The update is -grad in fp32 next to O(1) weights: its rounding is ~1e-7 absolute.
UPDATE_ATOL = 2e-6


# ----------------------------------------------------------------------------- loss level

def loss_inputs(seed: int = 0, vocab: int = 50, padded: int = 64, hidden: int = 16):
    """Student hidden [2, 5, H] and head [padded, H] (requiring grad), labels, a ragged mask,
    and a teacher of another width; logits O(1-3), so per-token divergences spread."""
    from megatron_opd.teachers.outputs import TeacherHidden

    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(2, 5, hidden, generator=generator).requires_grad_()
    student_head = (torch.randn(padded, hidden, generator=generator) * 0.6).requires_grad_()
    labels = torch.randint(0, vocab, (2, 5), generator=generator)
    mask = torch.tensor([[0, 1, 1, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float32)
    count = int(mask.sum())
    teacher = TeacherHidden(torch.randn(count, 24, generator=generator),
                            torch.randn(padded, 24, generator=generator) * 0.5)
    return student_hidden, student_head, labels, mask, teacher


def reference_terms(student_hidden, student_head, labels, mask, teacher, beta, temperature, vocab):
    """float64 per-token divergence and CE at the mask, differentiable in the student's hidden and head."""
    rows = mask.bool()
    logits = student_hidden[rows].double() @ student_head.double().T
    teacher_logits = teacher.hidden.double() @ teacher.head_weight.double().T
    divergence = dense_divergence(logits, teacher_logits, beta=beta, temperature=temperature, vocab_size=vocab)
    cross_entropy = -F.log_softmax(logits[:, :vocab], -1).gather(-1, labels[rows][:, None]).squeeze(-1)
    return divergence, cross_entropy


def grads_of(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_opsd_clip_clamps_each_token_and_a_clipped_token_passes_no_gradient():
    from megatron_opd.algorithms.gkd import GKDLoss

    student_hidden, student_head, labels, mask, teacher = loss_inputs()
    beta, temperature = 0.5, 1.3
    per_token, _ = reference_terms(student_hidden, student_head, labels, mask, teacher, beta, temperature, 50)
    clip = per_token.detach().median().item()  # about half the tokens above it
    clipped = per_token.detach() > clip
    assert 0 < int(clipped.sum()) < per_token.numel()

    loss = GKDLoss(beta=beta, temperature=temperature, sft_alpha=0.0, topk=None, vocab_size=50, opsd_clip=clip)
    value, tokens, metrics = loss(student_hidden, student_head, labels, mask, teacher)
    expected = torch.where(clipped, torch.full_like(per_token, clip), per_token).sum()
    assert int(tokens) == per_token.numel()
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["divergence_sum"].item() == pytest.approx(expected.item(), rel=1e-5)

    hidden_grad, head_grad = grads_of(value, student_hidden, student_head)
    ref_hidden_grad, ref_head_grad = grads_of(expected, student_hidden, student_head)
    rows = hidden_grad[mask.bool()]
    assert rows[clipped].abs().max() == 0, "a clipped token passed gradient"
    assert rows[~clipped].abs().min() > 0
    torch.testing.assert_close(hidden_grad.double(), ref_hidden_grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(head_grad.double(), ref_head_grad.double(), rtol=1e-4, atol=1e-6)
    # a clip above every token changes nothing
    loose = GKDLoss(beta=beta, temperature=temperature, sft_alpha=0.0, topk=None, vocab_size=50,
                    opsd_clip=per_token.max().item() + 1)
    assert loose(student_hidden, student_head, labels, mask, teacher)[0].item() == pytest.approx(
        per_token.sum().item(), rel=1e-5)


@pytest.mark.parametrize("with_sft", [True, False])
def test_sft_alpha_adds_alpha_times_ce_at_temperature_one_only_with_sft(with_sft):
    from megatron_opd.algorithms.gkd import GKDLoss

    student_hidden, student_head, labels, mask, teacher = loss_inputs(seed=1)
    alpha, beta, temperature = 0.7, 0.3, 2.0
    divergence, cross_entropy = reference_terms(student_hidden, student_head, labels, mask, teacher, beta,
                                                temperature, 50)
    expected = divergence.sum() + (alpha * cross_entropy.sum() if with_sft else 0.0)
    loss = GKDLoss(beta=beta, temperature=temperature, sft_alpha=alpha, topk=None, vocab_size=50)
    value, _, metrics = loss(student_hidden, student_head, labels, mask, teacher, with_sft=with_sft)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["divergence_sum"].item() == pytest.approx(divergence.sum().item(), rel=1e-5)
    assert ("sft_loss_sum" in metrics) == with_sft
    if with_sft:
        assert metrics["sft_loss_sum"].item() == pytest.approx(cross_entropy.sum().item(), rel=1e-5)
    for actual, reference in zip(grads_of(value, student_hidden, student_head),
                                 grads_of(expected, student_hidden, student_head)):
        torch.testing.assert_close(actual.double(), reference.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- trainer level

def write_opsd_rows(path: Path, rows: int, seed: int) -> Path:
    """Rows whose teacher_prompt holds the answer before the prompt (another length than it)."""
    generator = torch.Generator().manual_seed(seed)
    words = lambda ids: " ".join(f"w{i}" for i in ids)
    with open(path, "w") as handle:
        for _ in range(rows):
            prompt = torch.randint(1, VOCAB - 10, (int(torch.randint(3, 7, (1,), generator=generator)),),
                                   generator=generator).tolist()
            answer = completion_for(prompt)[:2]
            handle.write(json.dumps({"prompt": words(prompt), "completion": words(answer),
                                     "teacher_prompt": words(answer + [VOCAB - 1] + prompt)}) + "\n")
    return path


JOBS = {
    # the dataset's responses with the CE term, at a temperature that is not 1
    "dataset_sft": {"sft_alpha": SFT_ALPHA, "temperature": 2.0},
    # the student's samples, cut at max_completion_length; prompt + sample may pass data.max_length
    "student": {"lmbda": 1.0, "sft_alpha": SFT_ALPHA, "max_completion_length": MAX_COMPLETION,
                "data.max_length": 10},
    # the teacher's samples (top_k=1: its greedy continuation), with the CE term
    "seq_kd": {"lmbda": 0.0, "seq_kd": True, "top_k": 1, "sft_alpha": SFT_ALPHA, "max_completion_length": 4},
    # OPSD: the student fed each row's teacher_prompt is the teacher; per-token clip
    "opsd": {"teacher": "self", "teacher_model": "null", "opsd_clip": OPSD_CLIP, "data.val_dataset": "[]"},
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("loss_behaviour")
    setup = make_gkd_setup(root)
    setup["opsd_train"] = str(write_opsd_rows(root / "opsd.jsonl", 16, seed=5))
    return setup


@pytest.fixture(scope="module")
def runs(setup, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs")
    jobs = []
    for name, fields in JOBS.items():
        if name == "opsd":
            fields = {**fields, "data.dataset": f"[{setup['opsd_train']}]"}
        jobs.append({"argv": overrides(setup, out / name, **{**SGD, **fields}), "steps": 1})
    results = run_distributed(run_trainer_jobs, 1, jobs, timeout=600)[0]
    return dict(zip(JOBS, results))


def check_against(result: dict, reference, sft: bool) -> None:
    metrics = result["steps"][0]["metrics"]
    assert metrics["tokens"] == reference.tokens
    assert metrics["loss"] == pytest.approx(reference.loss, rel=1e-5)
    assert metrics["divergence"] == pytest.approx(reference.divergence, rel=1e-5)
    if sft:
        assert metrics["sft_loss"] == pytest.approx(reference.cross_entropy, rel=1e-5)
    else:
        assert "sft_loss" not in metrics
    assert metrics["grad_norm"] == pytest.approx(reference.grad_norm, rel=1e-4)
    assert_update_is(result, reference.grads, scale=1.0, atol=UPDATE_ATOL)


def test_sft_alpha_on_dataset_responses_adds_alpha_times_ce(setup, runs):
    """loss = divergence (at temperature 2) + sft_alpha * CE (at temperature 1), and the update
    is minus the gradient of that sum; without the CE the update would differ by far more."""
    step = runs["dataset_sft"]["steps"][0]
    assert step["source"] == "dataset"
    reference = step_reference(setup["student"], setup["teacher"], step["examples"], beta=0.5, temperature=2.0,
                               sft_alpha=SFT_ALPHA)
    assert reference.loss == pytest.approx(reference.divergence + SFT_ALPHA * reference.cross_entropy)
    check_against(runs["dataset_sft"], reference, sft=True)
    without = step_reference(setup["student"], setup["teacher"], step["examples"], beta=0.5, temperature=2.0)
    assert max((without.grads[name] - reference.grads[name]).abs().max() for name in reference.grads) > 100 * UPDATE_ATOL


def test_student_samples_get_no_ce_and_train_on_every_sampled_token(setup, runs):
    """lmbda=1 with sft_alpha > 0: no CE on the student's own samples. Samples that hit
    max_completion_length (no EOS) are trained on whole: the loss mask covers exactly the
    sampled tokens, EOS included when there is one, and nothing else."""
    from transformers import AutoTokenizer

    step = runs["student"]["steps"][0]
    eos = AutoTokenizer.from_pretrained(setup["tokenizer"]).eos_token_id
    assert step["source"] == "student" and step["metrics"]["on_policy"] == 1.0
    assert not all(step["finished"]), "no sample reached max_completion_length"
    for prompt, completion, finished, example in zip(step["prompts"], step["completions"], step["finished"],
                                                     step["examples"]):
        assert 1 <= len(completion) <= MAX_COMPLETION
        assert finished == (completion[-1] == eos)
        assert eos not in completion[:-1]
        if not finished:
            assert len(completion) == MAX_COMPLETION
        assert example["input_ids"] == prompt + completion
        assert example["loss_mask"] == [0] * len(prompt) + [1] * len(completion)
        assert example["prompt_length"] == len(prompt)
    lengths = [len(completion) for completion in step["completions"]]
    assert step["metrics"]["tokens"] == sum(lengths)
    assert step["metrics"]["sample_length"] == pytest.approx(sum(lengths) / len(lengths))
    reference = step_reference(setup["student"], setup["teacher"], step["examples"], beta=0.5, temperature=1.0)
    check_against(runs["student"], reference, sft=False)


def test_sampled_sequences_are_not_cut_at_data_max_length(runs):
    """data.max_length bounds the dataset's rows (truncation at tokenization); a sampled
    response is bounded by max_completion_length only: prompt + sample may pass
    data.max_length and is trained on whole (the reference loss above covers every token)."""
    step = runs["student"]["steps"][0]
    longer = [(prompt, completion, example) for prompt, completion, example
              in zip(step["prompts"], step["completions"], step["examples"]) if len(prompt) + len(completion) > 10]
    assert longer, "no prompt + sample passed data.max_length=10: the case is not exercised"
    for prompt, completion, example in longer:
        assert len(prompt) < 10  # the dataset's prompts themselves fit
        assert len(example["input_ids"]) == len(prompt) + len(completion) > 10, "the sampled sequence was cut"
        assert sum(example["loss_mask"]) == len(completion)


def hf_greedy(model_dir: str, prompt: list[int], max_new_tokens: int, eos: int) -> list[int]:
    """Greedy continuation by HF transformers (float64), stopping after EOS or max_new_tokens."""
    model = hf_model(model_dir)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids])).logits[0, -1, :VOCAB].argmax())
            ids.append(token)
            if token == eos:
                break
    return ids[len(prompt):]


def test_seq_kd_trains_on_the_teachers_greedy_samples_with_ce(setup, runs):
    """seq_kd, lmbda=0, top_k=1: the responses are the teacher's greedy continuations (HF
    generate by hand), the loss is the divergence + sft_alpha * CE on them."""
    from transformers import AutoTokenizer

    step = runs["seq_kd"]["steps"][0]
    metrics = step["metrics"]
    assert step["source"] == "teacher" and metrics["teacher_sampled"] == 1.0 and metrics["on_policy"] == 0.0
    eos = AutoTokenizer.from_pretrained(setup["tokenizer"]).eos_token_id
    expected = [hf_greedy(setup["teacher"], prompt, 4, eos) for prompt in step["prompts"]]
    student_greedy = [hf_greedy(setup["student"], prompt, 4, eos) for prompt in step["prompts"]]
    assert expected != student_greedy, "teacher and student agree: the check could not tell them apart"
    assert step["completions"] == expected
    examples = [{"input_ids": prompt + completion, "loss_mask": [0] * len(prompt) + [1] * len(completion),
                 "prompt_length": len(prompt)} for prompt, completion in zip(step["prompts"], expected)]
    assert [example["input_ids"] for example in step["examples"]] == [e["input_ids"] for e in examples]
    assert [example["loss_mask"] for example in step["examples"]] == [e["loss_mask"] for e in examples]
    reference = step_reference(setup["student"], setup["teacher"], examples, beta=0.5, temperature=1.0,
                               sft_alpha=SFT_ALPHA)
    check_against(runs["seq_kd"], reference, sft=True)


def test_opsd_clip_through_the_trainer(setup, runs):
    """teacher: self with opsd_clip: the per-token divergence between the student on
    prompt + response and itself on teacher_prompt + response, clamped at opsd_clip; the
    update is the gradient of the clamped sum (clipped tokens contribute none)."""
    step = runs["opsd"]["steps"][0]
    assert all(example["teacher_prompt_ids"] for example in step["examples"])
    reference = step_reference(setup["student"], None, step["examples"], beta=0.5, temperature=1.0,
                               clip=OPSD_CLIP)
    clipped = int((reference.per_token > OPSD_CLIP).sum())
    assert 0 < clipped < reference.tokens, "opsd_clip must cut some tokens and not others"
    check_against(runs["opsd"], reference, sft=False)
    unclipped = step_reference(setup["student"], None, step["examples"], beta=0.5, temperature=1.0)
    assert unclipped.loss > reference.loss + 1e-3
