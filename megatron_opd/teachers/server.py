"""A teacher served over the network (`teacher_model_server`): vLLM or `megatron-opd serve-teacher`.

Per step, the last pipeline stage needs the teacher's top-K for every response token
of its microbatches (`teachers.outputs.TeacherTopK`). One rank per tensor-parallel
group asks (TP rank 0 of the last stage, so a TP group sends each sequence once, and
every data-parallel rank asks for its own share): one request per sequence, the
sequence cut after its last response token, `max_concurrency` in flight. The answers
are broadcast over the TP group, which needs them replicated (`sparse` kernels).

Failures are agreed on by all ranks (one all-reduce of a flag per call): the asking
rank raises the `TeacherServerError` naming the server, every other rank raises too,
so no rank hangs in a collective while another has failed.

At start, `connect` checks what would otherwise fail late or silently: the server
answers and serves the model, a probe sequence gets K log-probs per token inside the
student's vocab, and (`teacher_server.verify_tokenizer`) the server tokenizes a probe
text exactly as the student's tokenizer does. Both probes fit the server's context:
vLLM's `/v1/models` (and ours) gives `max_model_len`, and a request's prompt plus the
one generated token must fit in it.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state

from megatron_opd.config.job import TeacherServerConfig
from megatron_opd.data.tokenizer_match import probe_text
from megatron_opd.pipeline import Microbatch
from megatron_opd.runtime.agreement import run_agreed
from megatron_opd.teachers.outputs import TeacherTopK
from megatron_opd.teachers.server_client import (
    PromptLogprobs,
    TeacherServerClient,
    TeacherServerError,
    parse_prompt_logprobs,
    served_tokens,
)


def probe_limit(card: dict) -> Optional[int]:
    """The most prompt tokens a request to the model of `card` (its `/v1/models` entry) may
    have: `max_model_len` less the one token each request generates; None when not given."""
    length = card.get("max_model_len")
    if not isinstance(length, int) or isinstance(length, bool):
        return None
    return length - 1


def asks_the_server() -> bool:
    """Whether this rank sends its DP share's requests (TP rank 0 of the last stage)."""
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def response_spans(batch: Microbatch) -> list[Optional[tuple[list[int], list[int]]]]:
    """Per example of `batch` (one per row, or several in packed rows): the ids to send (through
    its last response token) and the prompt_logprobs positions of its response tokens in mask
    order; None for an example with none.

    Its loss mask's entry t marks predicting its token t + 1, i.e. prompt_logprobs entry t + 1.
    """
    spans: list = []
    for tokens, mask in batch.example_sequences():
        positions = [t + 1 for t, counted in enumerate(mask) if counted]
        spans.append((tokens[:positions[-1] + 1], positions) if positions else None)
    return spans


class ServerTeacher:
    """`forward(microbatches)` -> per microbatch the teacher's top-K at its response tokens."""

    def __init__(self, url: str, settings: TeacherServerConfig, k: int, vocab_size: int, tokenizer,
                 device: torch.device):
        self.url, self.settings, self.k, self.vocab_size = url, settings, k, vocab_size
        self.device = device
        self.client = TeacherServerClient(url, settings) if asks_the_server() else None
        self.model_name: Optional[str] = None
        self.max_prompt_tokens: Optional[int] = None  # the server's max_model_len - 1, when it says
        self._agree(lambda: self.connect(tokenizer))

    # ------------------------------------------------------------------ start

    def connect(self, tokenizer) -> None:
        cards = self.client.model_cards()
        names = [card["id"] for card in cards]
        wanted = self.settings.model_name
        if wanted is None:
            if len(names) != 1:
                raise TeacherServerError(f"teacher server {self.url} serves {names}: set teacher_server.model_name "
                                         "to the one to distill from")
            wanted = names[0]
        elif wanted not in names:
            raise TeacherServerError(f"teacher_server.model_name={wanted!r} is not served by {self.url} "
                                     f"(it serves {names})")
        self.model_name = wanted
        card = cards[names.index(wanted)]
        if isinstance(card.get("max_logprobs"), int) and card["max_logprobs"] < self.k:
            raise TeacherServerError(f"teacher server {self.url} returns at most {card['max_logprobs']} logprobs, "
                                     f"fewer than gkd_logits_topk={self.k}: restart it with --max-logprobs {self.k}")
        self.max_prompt_tokens = probe_limit(card)
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 2:
            raise TeacherServerError(f"teacher server {self.url} serves {wanted} with max_model_len="
                                     f"{card['max_model_len']}: too short to score even one token")
        text = probe_text(tokenizer, self.max_prompt_tokens)
        probe = tokenizer(text)["input_ids"]
        if self.settings.verify_tokenizer:
            self._check_tokenizer(text, probe)
        # The ids probe: the text's ids, or a cut of them where the tokenizer adds tokens of its own.
        self._ask([probe[:self.max_prompt_tokens]], where="the start-up probe")

    def _check_tokenizer(self, text: str, probe: list[int]) -> None:
        try:
            theirs = served_tokens(self.client.completion(self.model_name, text, prompt_logprobs=0))
        except TeacherServerError as error:
            raise TeacherServerError(f"{error}\n(checking the server's tokenizer on a text probe; a server without "
                                     "tokenizer files cannot: set teacher_server.verify_tokenizer: false if you "
                                     "know it uses the student's tokenizer)") from None
        except ValueError as error:
            raise TeacherServerError(f"teacher server {self.url}: its answer to the tokenizer probe: {error}") from None
        ours = probe[1:]
        if theirs != ours:
            first = next((i for i, (a, b) in enumerate(zip(theirs, ours)) if a != b), min(len(theirs), len(ours)))
            raise TeacherServerError(
                f"teacher server {self.url} tokenizes a probe text ({text[:60]!r}...) into other ids than the student's tokenizer "
                f"({len(theirs) + 1} vs {len(ours) + 1} tokens, first difference at token {first + 1}): teacher and "
                "student must share one tokenizer")

    # ------------------------------------------------------------------ per step

    def _ask(self, prompts: Sequence[list[int]], where: str) -> list[PromptLogprobs]:
        self._check_lengths(prompts, where)

        def one(index: int) -> PromptLogprobs:
            choice = self.client.completion(self.model_name, prompts[index], prompt_logprobs=self.k)
            try:
                return parse_prompt_logprobs(choice, prompts[index], self.k, self.vocab_size)
            except ValueError as error:
                raise TeacherServerError(f"teacher server {self.url}, {where}, sequence {index} "
                                         f"({len(prompts[index])} tokens): {error}") from None

        return self.client.map(one, range(len(prompts)))

    def _check_lengths(self, prompts: Sequence[list[int]], where: str) -> None:
        """Fail before sending when a sequence cannot fit the server's context (its 400 would say
        so too, but not which setting to change)."""
        limit = self.max_prompt_tokens
        longest = max((len(prompt) for prompt in prompts), default=0)
        if limit is not None and longest > limit:
            raise TeacherServerError(
                f"teacher server {self.url}, {where}: a sequence of {longest} tokens is longer than the "
                f"{limit} the server takes (max_model_len={limit + 1}, less the one token a request generates): "
                "start the server with a larger --max-model-len, or lower data.max_length")

    def _query(self, microbatches: list[Microbatch]) -> list[TeacherTopK]:
        spans = [response_spans(batch) for batch in microbatches]
        flat = [span for batch_spans in spans for span in batch_spans if span is not None]
        answers = iter(self._ask([ids for ids, _ in flat], where="a training step"))
        outputs = []
        for batch_spans in spans:
            logprobs, ids, labels = [], [], []
            for span in batch_spans:
                if span is None:
                    continue
                answer, rows = next(answers), np.asarray(span[1]) - 1
                logprobs.append(answer.logprobs[rows])
                ids.append(answer.ids[rows])
                labels.append(answer.token_logprobs[rows])
            outputs.append(TeacherTopK(torch.from_numpy(np.concatenate(logprobs) if logprobs else
                                                        np.empty((0, self.k), np.float32)),
                                       torch.from_numpy(np.concatenate(ids) if ids else np.empty((0, self.k), np.int64)),
                                       torch.from_numpy(np.concatenate(labels) if labels else np.empty(0, np.float32))))
        return outputs

    def _agree(self, work):
        """Run `work` on the asking ranks; every rank raises if any of them failed."""
        return run_agreed(work, runs_here=self.client is not None, catch=(TeacherServerError,), device=self.device,
                          elsewhere=lambda: TeacherServerError(f"a request to the teacher server {self.url} failed "
                                                               "on another rank (see the first error in the log)"))

    def forward(self, microbatches: list[Microbatch], examples: Optional[list] = None
                ) -> Optional[list[TeacherTopK]]:
        """The teacher's top-K per microbatch on the last stage (replicated over TP), None elsewhere."""
        answers = self._agree(lambda: self._query(microbatches))
        if not parallel_state.is_pipeline_last_stage():
            return None
        return [self._broadcast(answer, batch) for answer, batch in zip(answers or [None] * len(microbatches),
                                                                          microbatches)]

    def _broadcast(self, answer: Optional[TeacherTopK], batch: Microbatch) -> TeacherTopK:
        """TP rank 0's answer on every rank of the TP group, on the device."""
        count = batch.num_tokens
        if answer is not None and answer.ids.shape[0] != count:
            raise RuntimeError(f"the server answered {answer.ids.shape[0]} tokens for a microbatch of {count}")
        if parallel_state.get_tensor_model_parallel_world_size() == 1:
            return TeacherTopK(answer.logprobs.to(self.device), answer.ids.to(self.device),
                               answer.label_logprobs.to(self.device))
        values = torch.empty(count, self.k + 1, dtype=torch.float32, device=self.device)
        ids = torch.empty(count, self.k, dtype=torch.int64, device=self.device)
        if answer is not None:
            values.copy_(torch.cat([answer.logprobs, answer.label_logprobs.unsqueeze(-1)], dim=-1))
            ids.copy_(answer.ids)
        source = parallel_state.get_tensor_model_parallel_src_rank()
        group = parallel_state.get_tensor_model_parallel_group()
        torch.distributed.broadcast(values, source, group=group)
        torch.distributed.broadcast(ids, source, group=group)
        return TeacherTopK(values[:, :self.k], ids, values[:, self.k])

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


__all__ = ["ServerTeacher", "TeacherServerError", "response_spans"]
