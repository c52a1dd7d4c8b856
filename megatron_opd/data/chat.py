"""Token ids of a conversation through the chat template, and which of them are the
assistant's.

Written by hand: transformers' `apply_chat_template(return_assistant_tokens_mask=True)`
only works with templates that wrap assistant text in `{% generation %}` markers, which
most released templates (Llama 3, Qwen 2.5, Mistral) lack. Instead, for every assistant
turn i we render

    before_i = messages[:i]   with add_generation_prompt=True
    upto_i   = messages[:i+1]

and the turn's tokens are upto_i[len(before_i):] -- its content plus whatever the
template closes the turn with (the end-of-turn / EOS token, which the model must learn
to emit). This needs a prefix-stable template: before_i's ids must be a prefix of
upto_i's, and upto_i's a prefix of the whole conversation's. Templates that rewrite
earlier turns (Qwen3 dropping past <think> blocks) or whose generation prompt differs
from how a finished turn starts are refused with a TemplateError rather than given a
silently wrong mask.

Tokens the template puts after the turn's EOS (Qwen's "\n" after <|im_end|>) are not
response tokens: the model stops at EOS and never predicts them, so the span ends at the
last EOS in it.
"""

from __future__ import annotations

from typing import Any, Sequence

from megatron_opd.data.errors import TEMPLATE_ERROR, RowProblem, TemplateError

Message = dict[str, Any]


def render_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` through the chat template.

    Rendered to text, then tokenized without adding special tokens: the template writes
    BOS and the like itself (this is what `apply_chat_template(tokenize=True)` does too).
    """
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except Exception as error:  # jinja's raise_exception ("roles must alternate") and the like
        raise RowProblem(TEMPLATE_ERROR, f"the chat template refused the conversation: {error}") from error
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(tokenizer: Any, messages: Sequence[Message], first_response_turn: int,
                        prompt_only: bool = False) -> tuple[list[int], list[int]]:
    """`(input_ids, loss_mask)` of a conversation; the mask is 1 on assistant turns at index
    >= `first_response_turn` (earlier ones are prompt context) and 0 elsewhere.

    `prompt_only`: the messages are a prompt (no assistant answer yet); the ids end with
    the generation prompt and the mask is all 0.
    """
    if prompt_only:
        ids = render_ids(tokenizer, messages, add_generation_prompt=True)
        return ids, [0] * len(ids)
    full = render_ids(tokenizer, messages, add_generation_prompt=False)
    mask = [0] * len(full)
    eos = tokenizer.eos_token_id
    for i in range(first_response_turn, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        before = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else render_ids(tokenizer, messages[:i + 1], False)
        _check_prefix(tokenizer, before, upto, f"messages[:{i}] with the generation prompt",
                      f"messages[:{i + 1}]")
        _check_prefix(tokenizer, upto, full, f"messages[:{i + 1}]", "the whole conversation")
        start, end = len(before), len(upto)
        if end <= start:
            raise TemplateError(f"the chat template renders assistant turn {i} as no tokens")
        span = upto[start:end]
        if eos is not None and eos in span:
            end = start + len(span) - span[::-1].index(eos)
        mask[start:end] = [1] * (end - start)
    return full, mask


def _check_prefix(tokenizer: Any, prefix: list[int], ids: list[int], prefix_name: str, name: str) -> None:
    if ids[:len(prefix)] == prefix:
        return
    at = next((k for k, (a, b) in enumerate(zip(prefix, ids)) if a != b), min(len(prefix), len(ids)))
    raise TemplateError(
        f"the chat template is not prefix-stable: the ids of {prefix_name} are not a prefix of "
        f"those of {name} (first difference at token {at}: "
        f"{tokenizer.decode(prefix[at:at + 8])!r} vs {tokenizer.decode(ids[at:at + 8])!r}), so assistant "
        "tokens cannot be located; use a template that renders earlier turns and the generation "
        "prompt identically whatever follows")


__all__ = ["encode_conversation", "render_ids"]
