"""One batched teacher forward on every TP rank, and the broadcast that keeps the ranks in step.

Rank 0 decides what runs (the HTTP side and the scheduler live there); before each
batch it broadcasts a header `[command, b, s]` and the packed batch `[b, s + F]` over
the world group, and every rank, rank 0 included, runs `TeacherEngine.run` on it, so
the tensor-parallel collectives inside the forward and the top-K line up. The other
ranks only ever run `follow`. When idle, rank 0 broadcasts a heartbeat now and then,
so that the waiting ranks' collective never reaches the process group's timeout.

The math of a batch: prompts right-padded to one length `s`, one forward without an
attention mask (causal attention: a real position never sees the padding after it),
the final hidden states at the scored positions `[N, H]`, and
`ops.fused_linear_topk_logprobs` on the LM-head shard, which returns the same top-K of
the full-vocab log-softmax on every TP rank without gathering the vocab. A scored
position t of a prompt predicts token t + 1; the last position predicts the token this
server generates, sampled first by `ops.vocab_parallel_sample`. Log-probs are of the
raw model (temperature 1), whatever temperature the generated token is sampled at.

Each scored token also gets vLLM's rank (`vllm.v1.sample.ops.logprobs.batched_count_greater_than`):
its 1-based position when it is among the top-k its row asked for, else the number of
vocab entries whose value is >= its own (itself included), so a token tied with the
k-th value ranks k + 1, as vLLM's does. `token_ranks` counts in a second pass over the
logits of only the rows whose token is outside their top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist

from megatron_opd.models.outputs import forward_hidden_states, lm_head_weight
from megatron_opd.ops import fused_linear_topk_logprobs, vocab_parallel_sample
from megatron_opd.ops.vocab_parallel import owned_positions, row_chunks, tempered, vocab_shard
from megatron_opd.runtime import Runtime

BATCH, HEARTBEAT, STOP = 1, 2, 3
COMMANDS = {BATCH: "batch", HEARTBEAT: "heartbeat", STOP: "stop"}
NONE = -1  # "not requested" for the optional per-row fields on the wire


@dataclass(frozen=True)
class PromptJob:
    """One prompt to score, with what its request asked for."""

    token_ids: list[int]
    prompt_logprobs: Optional[int]  # top-k at each prompt position; None: no prompt scores
    logprobs: Optional[int]  # top-k at the generated token; None: not asked for
    max_tokens: int  # 0 or 1: whether a token is generated after the prompt
    temperature: float  # of that token's sampling; 0 is greedy
    seed: int  # of that token's sampling stream


@dataclass
class TopLogprobs:
    """Teacher scores at n positions: the top-k `ids` / `logprobs` `[n, k]` (sorted, descending),
    and of the tokens that actually follow, `token_ids` `[n]`, their log-probs `token_logprobs`
    `[n]` and vLLM's ranks `token_ranks` `[n]` int64 (see the module docstring)."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    token_ids: torch.Tensor
    token_logprobs: torch.Tensor
    token_ranks: torch.Tensor


@dataclass
class PromptScores:
    """A prompt's result: `prompt` for positions 0..L-2 (predicting prompt tokens 1..L-1),
    None when not asked for; `generated` for the token sampled after it (n = 1), None at max_tokens 0."""

    prompt: Optional[TopLogprobs]
    generated: Optional[TopLogprobs]


@dataclass
class Batch:
    """Prompts right-padded into `tokens` `[b, s]`, with one row of request fields per prompt (`[b]` each)."""

    tokens: torch.Tensor
    lengths: torch.Tensor
    prompt_logprobs: torch.Tensor  # NONE where not asked for
    logprobs: torch.Tensor  # NONE where not asked for
    max_tokens: torch.Tensor
    seeds: torch.Tensor
    temperatures: torch.Tensor  # float64

    # The int64 columns after the tokens in the packed form; temperatures travel as float64 bits.
    FIELDS = ("lengths", "prompt_logprobs", "logprobs", "max_tokens", "seeds", "temperatures")

    @classmethod
    def from_jobs(cls, jobs: list[PromptJob]) -> Batch:
        s = max(len(job.token_ids) for job in jobs)
        tokens = torch.zeros(len(jobs), s, dtype=torch.long)
        for row, job in enumerate(jobs):
            tokens[row, :len(job.token_ids)] = torch.tensor(job.token_ids, dtype=torch.long)

        def column(values: list) -> torch.Tensor:
            return torch.tensor([NONE if value is None else value for value in values], dtype=torch.long)

        return cls(tokens=tokens,
                   lengths=column([len(job.token_ids) for job in jobs]),
                   prompt_logprobs=column([job.prompt_logprobs for job in jobs]),
                   logprobs=column([job.logprobs for job in jobs]),
                   max_tokens=column([job.max_tokens for job in jobs]),
                   seeds=column([job.seed for job in jobs]),
                   temperatures=torch.tensor([job.temperature for job in jobs], dtype=torch.float64))

    def pack(self) -> torch.Tensor:
        """`[b, s + len(FIELDS)]` int64: what rank 0 broadcasts."""
        fields = [getattr(self, name) for name in self.FIELDS[:-1]] + [self.temperatures.view(torch.long)]
        return torch.cat([self.tokens, torch.stack(fields, dim=1)], dim=1)

    @classmethod
    def unpack(cls, packed: torch.Tensor) -> Batch:
        s = packed.shape[1] - len(cls.FIELDS)
        fields = {name: packed[:, s + i].contiguous() for i, name in enumerate(cls.FIELDS)}
        fields["temperatures"] = fields["temperatures"].view(torch.float64)
        return cls(tokens=packed[:, :s], **fields)

    @property
    def top_k(self) -> int:
        """The K every row's request is a prefix of (at least 1: the op needs one)."""
        return max(1, int(torch.maximum(self.prompt_logprobs, self.logprobs).max()))


class TeacherEngine:
    """Scores batches with a Megatron `GPTModel` (this rank's TP shard, one pipeline stage)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int, device: torch.device):
        self.model = model.eval()
        self.vocab_size = vocab_size  # the true vocab: padded ids are never returned
        self.device = device

    @torch.no_grad()
    def run(self, batch: Batch) -> list[PromptScores]:
        """Every row's scores (identical on all TP ranks). Collective: every rank calls it."""
        tokens = batch.tokens.to(self.device)
        b, s = tokens.shape
        positions = torch.arange(s, device=self.device).expand(b, s)
        hidden = forward_hidden_states(self.model, tokens, positions).transpose(0, 1)  # [b, s, H]
        weight = lm_head_weight(self.model)
        lengths = batch.lengths.to(self.device)
        generates = batch.max_tokens.to(self.device) == 1
        generated = self._sample(hidden, weight, batch, lengths, generates)

        # Scored positions: 0..L-2 of rows asking for prompt_logprobs, L-1 of rows that
        # generate. Row-major order, so each row's prompt positions come before its generated one.
        column = torch.arange(s, device=self.device)
        last = column == (lengths - 1).unsqueeze(1)
        wants_prompt = (batch.prompt_logprobs.to(self.device) != NONE).unsqueeze(1)
        scored = (wants_prompt & (column < (lengths - 1).unsqueeze(1))) | (last & generates.unsqueeze(1))
        next_tokens = torch.cat([tokens[:, 1:], tokens.new_zeros(b, 1)], dim=1)
        next_tokens = torch.where(last, generated.unsqueeze(1), next_tokens)
        rows, cols = scored.nonzero(as_tuple=True)
        k = batch.top_k
        targets = next_tokens[rows, cols]
        if rows.numel():
            top_logprobs, top_ids, token_logprobs = fused_linear_topk_logprobs(
                hidden[rows, cols], weight, k, token_ids=targets, vocab_size=self.vocab_size)
            row_k = self._row_k(batch, rows.cpu(), last[rows, cols].cpu()).to(self.device)
            ranks = token_ranks(hidden[rows, cols], weight, targets, top_ids, row_k, self.vocab_size)
        else:  # nothing to score; the same on every rank, so no rank enters the op alone
            top_logprobs = torch.empty(0, k, device=self.device)
            top_ids = torch.empty(0, k, dtype=torch.long, device=self.device)
            token_logprobs = torch.empty(0, device=self.device)
            ranks = torch.empty(0, dtype=torch.long, device=self.device)
        return self._split(batch, scored.sum(1).tolist(), targets.cpu(), top_ids.cpu(), top_logprobs.cpu(),
                           token_logprobs.cpu(), ranks.cpu())

    @staticmethod
    def _row_k(batch: Batch, rows: torch.Tensor, is_last: torch.Tensor) -> torch.Tensor:
        """`[n]`: the k each scored position's request asked for (`logprobs` at a generated
        token, `prompt_logprobs` at a prompt token; 0 where not asked for)."""
        k = torch.where(is_last, batch.logprobs[rows], batch.prompt_logprobs[rows])
        return k.clamp(min=0)

    def _sample(self, hidden: torch.Tensor, weight: torch.Tensor, batch: Batch, lengths: torch.Tensor,
                generates: torch.Tensor) -> torch.Tensor:
        """The generated token `[b]` of each row with max_tokens 1 (0 elsewhere), from the last
        prompt position's vocab-sharded logits. One sampling call per distinct temperature,
        each row from its own seeded stream, so a row's token depends on nothing else in the batch."""
        generated = torch.zeros(lengths.shape[0], dtype=torch.long, device=self.device)
        rows = generates.nonzero().squeeze(-1)
        if not rows.numel():
            return generated
        logits = hidden[rows, lengths[rows] - 1] @ weight.t()  # [g, V/tp]
        temperatures = batch.temperatures[rows.cpu()].tolist()
        seeds = batch.seeds[rows.cpu()].tolist()
        for temperature in sorted(set(temperatures)):
            members = [i for i, value in enumerate(temperatures) if value == temperature]
            index = torch.tensor(members, device=self.device)
            generated[rows[index]] = vocab_parallel_sample(
                logits[index], temperature=temperature, vocab_size=self.vocab_size,
                seeds=[seeds[i] for i in members])
        return generated

    @staticmethod
    def _split(batch: Batch, counts: list[int], targets: torch.Tensor, top_ids: torch.Tensor,
               top_logprobs: torch.Tensor, token_logprobs: torch.Tensor, ranks: torch.Tensor) -> list[PromptScores]:
        """The flat `[N, ...]` results back into rows, each cut to the k its request asked for."""

        def part(span: slice, k: int) -> TopLogprobs:
            return TopLogprobs(top_ids[span, :k], top_logprobs[span, :k], targets[span], token_logprobs[span],
                               ranks[span])

        results = []
        start = 0
        for row, count in enumerate(counts):
            end = start + count
            prompt_k, logprobs_k = int(batch.prompt_logprobs[row]), int(batch.logprobs[row])
            generated = None
            if int(batch.max_tokens[row]) == 1:
                end_prompt = end - 1
                generated = part(slice(end_prompt, end), max(logprobs_k, 0))
            else:
                end_prompt = end
            prompt = part(slice(start, end_prompt), prompt_k) if prompt_k != NONE else None
            results.append(PromptScores(prompt=prompt, generated=generated))
            start = end
        return results


def token_ranks(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, top_ids: torch.Tensor,
                row_k: torch.Tensor, vocab_size: int, chunk_size: Optional[int] = None) -> torch.Tensor:
    """vLLM's rank of each token `[n]` int64, from hidden states `[n, H]`, this rank's LM-head
    shard `[V/tp, H]`, the tokens `[n]`, the top ids `[n, k]` (descending, the same on every
    TP rank) and the k each row asked for `row_k` `[n]`.

    Inside its row's top-k a token's rank is its position there (vLLM lists the top-k with
    ranks 1..k and the token among them keeps its place). Outside, it is the count of real
    vocab ids whose logit is >= the token's, summed over the TP shards: vLLM counts
    log-probs >= the token's, the same order, since a log-prob is the logit minus one
    shift per row. Collective over the TP group: every rank calls it with the same rows.
    """
    k = top_ids.shape[1]
    hit = (top_ids == token_ids.unsqueeze(1)) & (torch.arange(k, device=top_ids.device) < row_k.unsqueeze(1))
    ranks = hit.long().argmax(dim=1) + 1  # the position inside the row's top-k, where it is there
    outside = (~hit.any(dim=1)).nonzero().squeeze(1)
    if outside.numel():  # the same rows on every rank: top_ids and token_ids are replicated
        ranks[outside] = _count_at_least(hidden[outside], weight, token_ids[outside], vocab_size, chunk_size)
    return ranks


@torch.no_grad()
def _count_at_least(hidden: torch.Tensor, weight: torch.Tensor, token_ids: torch.Tensor, vocab_size: int,
                    chunk_size: Optional[int]) -> torch.Tensor:
    """Per row `[m]`: how many real vocab ids have a logit >= that of `token_ids` `[m]`
    (the token itself included), over the whole sharded vocab. Padding ids never count."""
    shard = vocab_shard(weight.shape[0], vocab_size, None)
    owned, local = owned_positions(token_ids.unsqueeze(1), shard)
    counts = []
    for out, rows in row_chunks(None, hidden.shape[0], shard.local_vocab, chunk_size):
        logits = tempered(hidden[rows] @ weight.t(), shard, 1.0)  # padding at NEG_INF: below any real logit
        # The token's logit lives on one shard: MAX over ranks of (its logit there, -inf elsewhere).
        mine = torch.where(owned[out], logits.gather(1, local[out]), torch.full_like(logits[:, :1], -float("inf")))
        theirs = shard.all_reduce(mine, dist.ReduceOp.MAX)
        counts.append(shard.all_reduce((logits >= theirs).sum(dim=1)))
    return torch.cat(counts) if counts else token_ids.new_empty(0)


class BatchChannel:
    """Rank 0 -> every rank of the world group: the next command, and for a batch its tensors.

    Tensors travel on the runtime's device (CPU with gloo, the rank's GPU with NCCL).
    With one rank nothing is sent.
    """

    def __init__(self, runtime: Runtime):
        self.device = runtime.device
        self.world_size = runtime.world_size
        self.rank = runtime.rank

    def send(self, command: int, batch: Optional[Batch] = None) -> None:
        if self.rank != 0:
            raise RuntimeError("only rank 0 sends commands")
        if self.world_size == 1:
            return
        b, s = (batch.tokens.shape if batch is not None else (0, 0))
        dist.broadcast(torch.tensor([command, b, s], dtype=torch.long, device=self.device), src=0)
        if batch is not None:
            dist.broadcast(batch.pack().to(self.device), src=0)

    def receive(self) -> Union[int, Batch]:
        """The next command from rank 0: a `Batch` to run, or HEARTBEAT / STOP."""
        header = torch.empty(3, dtype=torch.long, device=self.device)
        dist.broadcast(header, src=0)
        command, b, s = header.tolist()
        if command not in COMMANDS:
            raise RuntimeError(f"rank {self.rank} received unknown command {command} from rank 0")
        if command != BATCH:
            return command
        packed = torch.empty(b, s + len(Batch.FIELDS), dtype=torch.long, device=self.device)
        dist.broadcast(packed, src=0)
        return Batch.unpack(packed.cpu())


def follow(channel: BatchChannel, engine: TeacherEngine) -> None:
    """Ranks other than 0: run every batch rank 0 broadcasts, until it says STOP."""
    while True:
        message = channel.receive()
        if isinstance(message, Batch):
            engine.run(message)
        elif message == STOP:
            return
