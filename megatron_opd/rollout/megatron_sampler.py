"""Autoregressive sampling from a live Megatron `GPTModel` at any TP/PP layout, on CPU or GPU.

The generation loop is Megatron-Core's static-batching scheme: prompts of different
lengths are right-padded into one `[B, T]` buffer; decoding starts at the shortest
prompt, and at position t a row whose prompt is longer than t keeps its own prompt
token instead of the sampled one. Every row then attends only to its real tokens, at
their true positions, with no attention mask and no left-padding offsets. The KV cache
is Megatron's `StaticInferenceContext`: after a prefill of the shortest prompt, each
step feeds one token per row. Without the cache (`use_kv_cache=False`) each step
re-runs the whole prefix; both give the same ids (see the tests), the cache is faster.

Finished rows leave the batch: once at least an eighth of the rows still decoding have hit
EOS or their token limit, the survivors' KV-cache rows are moved to the front of the cache
and later steps feed only them (`compact_finished=False` keeps every row to the end; the
ids are the same either way, since each row draws from its own seeded stream). The copy
reads the survivors' cache once, about one decode step's attention; the eighth bounds the
number of copies by about 8 ln(rows).

Per step, the last stage applies the LM-head shard to the last hidden state
(`[B, H] @ [V/tp, H]^T`, logits stay vocab-sharded) and draws with
`ops.vocab_parallel_sample` (Gumbel-max over the shards, each row from its own seeded
stream), so every TP rank gets the same ids without gathering the vocab; the ids are
then broadcast to the other pipeline stages. Under sequence parallelism the model is
switched to plain TP for the duration (Megatron's own static inference refuses SP; a
one-token step cannot be split over the sequence).

Written here rather than taken from Megatron's `TextGenerationController`: that needs
Megatron's tokenizer wrappers and request objects, gathers the full-vocab logits
for sampling, and its pipeline communication asserts CUDA tensors.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_opd.models.outputs import forward_hidden_states, lm_head_weight
from megatron_opd.models.tp_layout import unwrap
from megatron_opd.ops import vocab_parallel_sample
from megatron_opd.pipeline import eval_mode
from megatron_opd.rollout.protocol import Rollout, SamplingParams, check_request
from megatron_opd.runtime.progress import Heartbeat

# Module attributes through which Megatron-Core layers switch sequence parallelism on.
_SEQUENCE_PARALLEL_ATTRIBUTES = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


class MegatronSampler:
    """Generates with `model`'s current weights (a student being trained, or a frozen teacher).

    `vocab_size`: the tokenizer's true vocabulary; padded ids are never sampled.
    """

    def __init__(self, model: torch.nn.Module, vocab_size: int, use_kv_cache: bool = True, label: str = "student",
                 progress_interval_s: float = 30.0, compact_finished: bool = True):
        self.model = model
        self.gpt = unwrap(model)
        self.vocab_size = vocab_size
        self.use_kv_cache, self.compact_finished = use_kv_cache, compact_finished
        self.label, self.progress_interval_s = label, progress_interval_s

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        started = time.monotonic()
        lengths = check_request(prompts, params, seeds, self.vocab_size)
        device = next(self.model.parameters()).device
        batch = len(prompts)
        total = max(length + params.max_new_tokens for length in lengths)
        tokens = torch.zeros(batch, total, dtype=torch.long, device=device)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
        prompt_lengths = torch.tensor(lengths, device=device)
        generated = torch.zeros(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        eos = torch.tensor(params.eos_token_ids or [-1], device=device)
        row_seeds = list(seeds) if params.temperature > 0 else None

        context = StaticInferenceContext(batch, total) if self.use_kv_cache else None
        cached = 0  # positions already in the KV cache
        passes = 0
        active = torch.arange(batch, device=device)  # the rows still in the batch, in cache order
        heartbeat = Heartbeat(f"sampling ({self.label})", self.progress_interval_s)
        with self._inference_mode():
            for position in range(min(lengths), total):
                start = cached if context is not None else 0
                hidden = self._forward(tokens[active, start:position], start, context)
                passes += 1
                if context is not None:
                    context.increment_sequence_len_offset(position - start)
                    context.enable_decode_mode()
                    cached = position
                sampling = (prompt_lengths[active] <= position) & ~finished[active]
                active_seeds = None if row_seeds is None else [row_seeds[row] for row in active.tolist()]
                ids = self._sample(hidden, sampling, params, active_seeds, position)
                tokens[active, position] = torch.where(sampling, ids, tokens[active, position])
                generated[active] += sampling.long()
                finished[active] |= sampling & (torch.isin(ids, eos) | (generated[active] == params.max_new_tokens))
                if bool(finished.all()):
                    break
                done = finished[active]
                if self.compact_finished and int(done.sum()) >= max(1, len(active) // 8):
                    keep = (~done).nonzero().squeeze(-1)
                    if context is not None:
                        _keep_cache_rows(context, keep, cached)
                    active = active[keep]
                heartbeat(f"{int(generated.max())}/{params.max_new_tokens} tokens, "
                          f"{int(finished.sum())}/{batch} responses finished")

        completions = [tokens[row, lengths[row]:lengths[row] + int(generated[row])].tolist() for row in range(batch)]
        ended_on_eos = [bool(completion) and completion[-1] in params.eos_token_ids for completion in completions]
        return Rollout(completions, ended_on_eos, seconds=time.monotonic() - started, forward_passes=passes)

    def weights_changed(self) -> None:
        """Nothing to do: the sampler generates with the live model."""

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ one step

    def _forward(self, input_ids: torch.Tensor, start: int, context) -> Optional[torch.Tensor]:
        """This stage's forward of `input_ids` `[B, s]` at positions `start..start+s-1`.
        Returns the last position's final hidden state `[B, H]` on the last stage."""
        batch, length = input_ids.shape
        positions = torch.arange(start, start + length, device=input_ids.device).expand(batch, length)
        if not parallel_state.is_pipeline_first_stage():
            received = torch.empty(length, batch, self.gpt.config.hidden_size,
                                   dtype=self.gpt.config.params_dtype, device=input_ids.device)
            dist.recv(received, src=parallel_state.get_pipeline_model_parallel_prev_rank())
            self.gpt.set_input_tensor(received)
        hidden = forward_hidden_states(self.model, input_ids, positions, inference_context=context)
        if not parallel_state.is_pipeline_last_stage():
            dist.send(hidden.contiguous(), dst=parallel_state.get_pipeline_model_parallel_next_rank())
            return None
        return hidden[-1]

    def _sample(self, hidden: Optional[torch.Tensor], sampling: torch.Tensor, params: SamplingParams,
                seeds: Optional[list[int]], position: int) -> torch.Tensor:
        """Next ids `[B]` on every rank: drawn on the last stage for the `sampling` rows
        (others get 0; a row's noise is keyed by its seed and `position`), broadcast over the pipeline."""
        ids = torch.zeros(sampling.shape[0], dtype=torch.long, device=sampling.device)
        if parallel_state.is_pipeline_last_stage():
            rows = sampling.nonzero().squeeze(-1)
            if rows.numel():
                logits = hidden[rows] @ lm_head_weight(self.model).t()  # [rows, V/tp]
                ids[rows] = vocab_parallel_sample(
                    logits, temperature=params.temperature, top_k=params.top_k, vocab_size=self.vocab_size,
                    seeds=[seeds[row] for row in rows.tolist()] if seeds is not None else None, step=position,
                    tp_group=parallel_state.get_tensor_model_parallel_group())
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(ids, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                           group=parallel_state.get_pipeline_model_parallel_group())
        return ids

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _inference_mode(self) -> Iterator[None]:
        """Eval mode (no dropout; Megatron uses the KV cache only when not training) and no
        sequence parallelism, restored afterwards.

        The SP switch sets the same module attributes as Megatron's
        `set_model_to_sequence_parallel`, without its module cache, which is global and
        keyed by `id(model)` (a later model at a reused address would get stale modules).
        """
        switched = []
        if self.gpt.config.sequence_parallel:
            switched = [(module, name, getattr(module, name)) for module in self.gpt.modules()
                        for name in _SEQUENCE_PARALLEL_ATTRIBUTES if hasattr(module, name)]
            switched.append((self.gpt.config, "sequence_parallel", True))
        for owner, name, _ in switched:
            setattr(owner, name, False)
        try:
            with eval_mode(self.model):
                yield
        finally:
            for owner, name, value in switched:
                setattr(owner, name, value)


def _keep_cache_rows(context: StaticInferenceContext, keep: torch.Tensor, cached: int) -> None:
    """Moves the cached keys and values of batch rows `keep` `[n]` (indices into the current
    batch, ascending) to rows 0..n-1 of every layer's cache `[max_seq, max_batch, ...]`.
    Megatron's attention reads and writes rows `batch_size_offset .. + batch`, i.e. 0..n-1
    once only n rows are fed; the rows past n are stale and never read again."""
    for memories in context.key_value_memory_dict.values():
        for memory in memories:
            memory[:cached, :len(keep)] = memory[:cached, keep]
