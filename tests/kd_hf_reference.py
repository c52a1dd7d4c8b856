"""Independent float64 references for one GKD step, from Hugging Face transformers.

The references import nothing from `megatron_opd` (only the rank body at the end does):
the student and teacher are the HF models on disk (run in float64), the per-token divergence is `tests.divergence_reference` (written from
the spec), the CE is log_softmax at temperature 1 written out. A trainer step with SGD
at lr=1 and no clipping moves each weight by minus the gradient of

    loss = (sum over response tokens of [clip(D_beta(t)) + sft_alpha * CE(t)]) / N

over the global batch (N its response tokens), which `step_reference` computes by
autograd on the HF student, together with the loss terms and the global grad norm.

Also here: the rank body that runs trainer steps and captures what a step trained on
(`run_trainer_jobs`), shared by the new behaviour tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tests.divergence_reference import dense_divergence
from tests.hf_models import VOCAB


@functools.lru_cache(maxsize=8)
def hf_model(directory: str) -> torch.nn.Module:
    """The HF model at `directory` in float64, eval mode (no dropout)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.double().eval()


def response_positions(input_ids: list[int], loss_mask: list[int]) -> torch.Tensor:
    """Positions t whose logits predict a response token (loss_mask[t + 1] == 1)."""
    return torch.tensor(loss_mask[1:], dtype=torch.bool).nonzero().squeeze(-1)


def teacher_view(example: dict) -> tuple[list[int], list[int]]:
    """OPSD: the teacher reads teacher_prompt + the same response (the rows' own ids, no megatron_opd)."""
    start = example["prompt_length"]
    prompt = example["teacher_prompt_ids"]
    return list(prompt) + list(example["input_ids"][start:]), [0] * len(prompt) + list(example["loss_mask"][start:])


@dataclass
class StepReference:
    loss: float  # per token of the global batch
    divergence: float  # clipped divergence per token
    cross_entropy: float  # CE per token (unweighted)
    per_token: torch.Tensor  # [N] unclipped divergences, in example order
    grads: dict[str, torch.Tensor]  # HF parameter name -> float64 gradient of `loss`
    grad_norm: float  # global L2 norm over every HF parameter
    tokens: int


def step_reference(student_dir: str, teacher_dir: str | None, examples: list[dict], *, beta: float,
                   temperature: float, sft_alpha: float = 0.0, clip: float | None = None,
                   topk: int | None = None, vocab: int | None = None) -> StepReference:
    """The reference loss and gradient of one step on `examples` (dicts with input_ids,
    loss_mask, prompt_length, teacher_prompt_ids). `teacher_dir` None: teacher: self, the
    student's own weights fed the teacher view, without gradient. `topk`: the divergence over
    the teacher's K most likely ids, both renormalized there (gkd_logits_topk). `vocab`: both
    models' logits cut to the first `vocab` ids (the tokenizer's), for models whose config
    vocab_size is larger and differs (Qwen2.5-7B 152064 / 0.5B 151936)."""
    student = hf_model(student_dir)
    teacher = hf_model(teacher_dir) if teacher_dir is not None else student
    student.zero_grad(set_to_none=True)
    divergences, cross_entropies = [], []
    for example in examples:
        ids = torch.tensor(example["input_ids"])
        rows = response_positions(example["input_ids"], example["loss_mask"])
        logits = student(ids[None, :-1]).logits[0, rows, :vocab]
        labels = ids[1:][rows]
        if teacher_dir is None:
            teacher_ids, teacher_mask = teacher_view(example)
            teacher_rows = response_positions(teacher_ids, teacher_mask)
            teacher_ids = torch.tensor(teacher_ids)
        else:
            teacher_ids, teacher_rows = ids, rows
        with torch.no_grad():
            teacher_logits = teacher(teacher_ids[None, :-1]).logits[0, teacher_rows, :vocab]
        assert logits.shape == teacher_logits.shape
        divergences.append(dense_divergence(logits, teacher_logits, beta=beta, temperature=temperature, topk=topk))
        cross_entropies.append(-F.log_softmax(logits, dim=-1).gather(-1, labels[:, None]).squeeze(-1))
    per_token, cross_entropy = torch.cat(divergences), torch.cat(cross_entropies)
    clipped = per_token if clip is None else torch.where(per_token > clip, torch.full_like(per_token, clip),
                                                         per_token)
    tokens = per_token.numel()
    loss = (clipped.sum() + sft_alpha * cross_entropy.sum()) / tokens
    loss.backward()
    grads = {name: param.grad.detach().clone() for name, param in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    grad_norm = torch.sqrt(sum((grad ** 2).sum() for grad in grads.values())).item()
    return StepReference(loss.item(), clipped.sum().item() / tokens, cross_entropy.sum().item() / tokens,
                         per_token.detach(), grads, grad_norm, tokens)


def megatron_to_hf_names(num_layers: int = 4) -> dict[str, str]:
    """Megatron weights that are HF weights one to one (no fused layout), Qwen2/Llama names."""
    names = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
             "decoder.final_layernorm.weight": "model.norm.weight"}
    for layer in range(num_layers):
        megatron, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        names[megatron + "self_attention.linear_proj.weight"] = hf + "self_attn.o_proj.weight"
        names[megatron + "mlp.linear_fc2.weight"] = hf + "mlp.down_proj.weight"
        names[megatron + "input_layernorm.weight"] = hf + "input_layernorm.weight"
        names[megatron + "pre_mlp_layernorm.weight"] = hf + "post_attention_layernorm.weight"
    return names


def assert_update_is(result: dict, expected_grads: dict[str, torch.Tensor], scale: float, atol: float) -> None:
    """The step moved every one-to-one weight by -scale * its reference gradient (and padded vocab rows not at all)."""
    for megatron, hf in megatron_to_hf_names().items():
        update = (result["weights_after"][megatron] - result["weights_before"][megatron]).double()
        if update.shape[0] > VOCAB and megatron.startswith("embedding"):
            assert update[VOCAB:].abs().max() == 0, "padded vocab rows moved"
            update = update[:VOCAB]
        torch.testing.assert_close(update, -scale * expected_grads[hf], rtol=0, atol=atol, msg=lambda m, name=megatron: f"{name}: {m}")


# ----------------------------------------------------------------------------- rank body

_EXAMPLE_KEYS = ("input_ids", "loss_mask", "prompt_length", "teacher_prompt_ids")


def run_trainer_jobs(jobs: list[dict]) -> list[dict]:
    """On one rank: for each job {argv, steps}, a `Trainer` from the overrides and `steps`
    train steps. Per step: the metrics, the examples it trained on, the sampled completions
    (with whether each ended on EOS), the lr the optimizer step applied (from the SGD
    update over the gradient it used); the full weights before and after the first step."""
    from megatron_opd.config.job import load_job_config
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.trainer.trainer import Trainer

    results = []
    for job in jobs:
        trainer = Trainer(load_job_config(None, job["argv"]))
        seen: dict = {}
        responses, sample = trainer.algorithm.responses, trainer.context.sample_responses

        def capture_responses(context, iteration, responses=responses, seen=seen):
            out = responses(context, iteration)
            seen["examples"] = [{key: example.get(key) for key in _EXAMPLE_KEYS} for example in out.examples]
            seen["source"] = out.source
            return out

        def capture_samples(examples, source, iteration, sample=sample, seen=seen):
            sampled, rollout = sample(examples, source, iteration)
            seen["prompts"] = [example["input_ids"][:example["prompt_length"]] for example in examples]
            seen["completions"], seen["finished"] = rollout.completions, rollout.finished
            return sampled, rollout

        trainer.algorithm.responses = capture_responses
        trainer.context.sample_responses = capture_samples
        params = [param for param in trainer.model.parameters()]
        steps, result = [], {}
        for step in range(job["steps"]):
            if step == 0:
                result["weights_before"] = {name: t.clone() for name, t in gather_full_tensors(trainer.model)}
            before = torch.cat([param.detach().flatten().clone() for param in params])
            seen.clear()
            metrics = trainer.train_step()
            after = torch.cat([param.detach().flatten() for param in params])
            grad = torch.cat([param.main_grad.detach().flatten() for param in params]).double()
            applied_lr = -((after - before).double() @ grad / (grad @ grad)).item()
            steps.append({"metrics": metrics, "applied_lr": applied_lr, **seen})
            if step == 0:
                result["weights_after"] = {name: t.clone() for name, t in gather_full_tensors(trainer.model)}
        result["steps"] = steps
        results.append(result)
    return results
