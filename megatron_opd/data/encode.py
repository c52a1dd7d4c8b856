"""One dataset row -> token ids, loss mask, prompt length and teacher prompt ids.

Row formats (ms-swift / TRL conventions):

- `messages`: a list of {role, content} with roles system / user / assistant; every
  assistant turn is a response (loss on), the rest is context. It must not start with
  an assistant turn, and must end with one (a conversation without any assistant turn
  is a prompt-only row, kept only with `allow_prompt_only`).
- `prompt` + `completion`: strings, or message lists (TRL's conversational form; a
  string prompt next to a message-list completion counts as one user message, and
  vice versa). Only the completion is a response. String pairs are rendered as
  `prompt_format` says; message lists always go through the chat template.
- optional `teacher_prompt` (string, OPSD's privileged prompt): the prompt the teacher
  sees instead of the student's. Rendered the way the row's prompt is: through the chat
  template it replaces the content of the prompt's last user message (system and
  earlier turns kept, as ms-swift does), raw it is tokenized alone.

Problems raise RowProblem(reason, detail); the builder adds file and row.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from megatron_opd.config.schema import fail
from megatron_opd.data.chat import Message, encode_conversation
from megatron_opd.data.errors import BAD_CONTENT, BAD_ORDER, BAD_ROLE, BAD_TYPE, EMPTY_RESPONSE, NO_FORMAT, RowProblem
from megatron_opd.data.truncation import Encoded

ROLES = ("system", "user", "assistant")
_NO_COMPLETION = "row has no completion (prompt-only rows need data.allow_prompt_only=true)"


def encode_row(row: Mapping[str, Any], tokenizer: Any, prompt_format: str, allow_prompt_only: bool) -> Encoded:
    """The untruncated encoding of `row` (see the module docstring for the formats)."""
    messages, prompt, completion = row.get("messages"), row.get("prompt"), row.get("completion")
    if messages is not None and (prompt is not None or completion is not None):
        raise RowProblem(NO_FORMAT, "row has both 'messages' and 'prompt'/'completion'; give one format")
    teacher_prompt = _teacher_prompt(row.get("teacher_prompt"))
    if messages is not None:
        messages = _messages(messages, "messages")
        return _encode_chat(tokenizer, messages, 0, teacher_prompt, allow_prompt_only)
    if prompt is None:
        what = "'completion' without 'prompt'" if completion is not None else "neither 'messages' nor 'prompt'"
        raise RowProblem(NO_FORMAT, f"row has {what}; expected 'messages', or 'prompt' + 'completion'")
    if isinstance(prompt, str) and not prompt.strip():
        raise RowProblem(BAD_TYPE, "prompt is empty")
    if isinstance(prompt, str) and (completion is None or isinstance(completion, str)) and prompt_format == "raw":
        return _encode_raw(tokenizer, prompt, completion, teacher_prompt, allow_prompt_only)
    if isinstance(prompt, str):
        prompt_messages = [{"role": "user", "content": prompt}]
    else:
        prompt_messages = _messages(prompt, "prompt")
    if completion is None:
        if not allow_prompt_only:
            raise RowProblem(EMPTY_RESPONSE, _NO_COMPLETION)
        completion_messages: list[Message] = []
    elif isinstance(completion, str):
        _check_response(completion, "completion")
        completion_messages = [{"role": "assistant", "content": completion}]
    else:
        completion_messages = _messages(completion, "completion")
        if not any(m["role"] == "assistant" for m in completion_messages):
            raise RowProblem(EMPTY_RESPONSE, "completion has no assistant message")
    return _encode_chat(tokenizer, prompt_messages + completion_messages, len(prompt_messages), teacher_prompt,
                        allow_prompt_only)


def _encode_chat(tokenizer: Any, messages: list[Message], first_response_turn: int,
                 teacher_prompt: Optional[str], allow_prompt_only: bool) -> Encoded:
    if getattr(tokenizer, "chat_template", None) is None:  # a tokenizer problem: never skipped
        fail("data.tokenizer", getattr(tokenizer, "name_or_path", tokenizer),
             "a tokenizer with a chat template for rows given as messages")
    if not messages:
        raise RowProblem(BAD_TYPE, "the conversation is empty")
    assistant_turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    response_turns = [i for i in assistant_turns if i >= first_response_turn]
    if assistant_turns and assistant_turns[0] == 0:
        raise RowProblem(BAD_ORDER, "the conversation starts with an assistant turn")
    prompt_only = not response_turns
    if prompt_only:
        if not allow_prompt_only:
            raise RowProblem(EMPTY_RESPONSE, "row has no assistant response (prompt-only rows need "
                                             "data.allow_prompt_only=true)")
        if messages[-1]["role"] == "assistant":
            raise RowProblem(BAD_ORDER, "a prompt-only conversation must not end with an assistant turn")
    elif messages[-1]["role"] != "assistant":
        raise RowProblem(BAD_ORDER, f"the conversation ends with a {messages[-1]['role']!r} turn after its "
                                    "last assistant turn")
    for i in response_turns:
        _check_response(messages[i]["content"], f"assistant turn {i}")
    input_ids, loss_mask = encode_conversation(tokenizer, messages, first_response_turn, prompt_only)
    prompt_length = loss_mask.index(1) if not prompt_only else len(input_ids)
    teacher_ids = None
    if teacher_prompt is not None:
        prompt_messages = messages[:response_turns[0]] if response_turns else messages
        users = [i for i, m in enumerate(prompt_messages) if m["role"] == "user"]
        if not users:
            raise RowProblem(BAD_ORDER, "teacher_prompt replaces the prompt's last user message, but it has none")
        teacher_messages = [dict(m) for m in prompt_messages]
        teacher_messages[users[-1]]["content"] = teacher_prompt
        teacher_ids, _ = encode_conversation(tokenizer, teacher_messages, len(teacher_messages), prompt_only=True)
    return Encoded(input_ids, loss_mask, prompt_length, teacher_ids)


def _encode_raw(tokenizer: Any, prompt: str, completion: Optional[str], teacher_prompt: Optional[str],
                allow_prompt_only: bool) -> Encoded:
    """prompt ids + completion ids + [EOS]; no BOS or other special tokens are added."""
    prompt_ids = _plain_ids(tokenizer, prompt)
    if not prompt_ids:
        raise RowProblem(BAD_TYPE, "prompt has no tokens")
    teacher_ids = _plain_ids(tokenizer, teacher_prompt) if teacher_prompt is not None else None
    if teacher_ids is not None and not teacher_ids:
        raise RowProblem(BAD_TYPE, "teacher_prompt has no tokens")
    if completion is None:
        if not allow_prompt_only:
            raise RowProblem(EMPTY_RESPONSE, _NO_COMPLETION)
        return Encoded(prompt_ids, [0] * len(prompt_ids), len(prompt_ids), teacher_ids)
    _check_response(completion, "completion")
    response = _plain_ids(tokenizer, completion) + [tokenizer.eos_token_id]
    return Encoded(prompt_ids + response, [0] * len(prompt_ids) + [1] * len(response), len(prompt_ids),
                   teacher_ids)


def _plain_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _messages(value: Any, column: str) -> list[Message]:
    """`value` checked as a list of {role, content}; returned as plain dicts without the
    keys that are None (a struct column gives every row every key other rows have)."""
    if not isinstance(value, (list, tuple)):
        kinds = "a list" if column == "messages" else "a string or a list"
        raise RowProblem(BAD_TYPE, f"{column} must be {kinds} of {{role, content}} messages, "
                                   f"got {_got(value)}{_fix(value, text_allowed=column != 'messages')}")
    if not value:
        raise RowProblem(BAD_TYPE, f"{column} is an empty list")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowProblem(BAD_TYPE, f"{column}[{i}] must be a {{role, content}} mapping, got {_got(message)}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowProblem(BAD_ROLE, f"{column}[{i}].role is {role!r}; allowed: {list(ROLES)}")
        if not isinstance(content, str):
            raise RowProblem(BAD_CONTENT, f"{column}[{i}].content must be a string, got {_got(content)}"
                                          f"{_fix(content, text_allowed=True)}")
        messages.append({key: item for key, item in message.items() if item is not None})
    return messages


def _check_response(text: Any, name: str) -> None:
    if not isinstance(text, str):
        raise RowProblem(BAD_TYPE, f"{name} must be a string or a list of messages, got {_got(text)}"
                                   f"{_fix(text, text_allowed=True)}")
    if not text.strip():
        raise RowProblem(EMPTY_RESPONSE, f"{name} is empty")


def _teacher_prompt(value: Any) -> Optional[str]:
    if value is None:
        return None
    if not isinstance(value, str):
        raise RowProblem(BAD_TYPE, f"teacher_prompt must be a string, got {_got(value)}"
                                   f"{_fix(value, text_allowed=True)}")
    if not value.strip():
        raise RowProblem(BAD_TYPE, "teacher_prompt is empty")
    return value


def _got(value: Any) -> str:
    """`value`'s type and a short rendering of it, e.g. `int 3`, for a message."""
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _fix(value: Any, text_allowed: bool) -> str:
    """What to write instead of a wrongly typed `value` (empty when there is nothing obvious)."""
    if text_allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"; write it as a JSON string: \"{value}\""
    if isinstance(value, Mapping) and "role" in value:
        return "; put a single message in a list: [{\"role\": ..., \"content\": ...}]"
    return ""


__all__ = ["ROLES", "encode_row"]
