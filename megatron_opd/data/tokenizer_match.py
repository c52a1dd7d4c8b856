"""Whether two tokenizers give the same ids: the first difference between them, in words.

A teacher scores the student's token ids, so one id must mean one text to both: the
sizes, every special token's id, the whole token -> id map, and the ids of a probe text
(which catches tokenizers whose normalizer, pre-tokenizer or merges differ over one vocab).
"""

from __future__ import annotations

import json
from typing import Any, Optional

from megatron_opd.runtime.fingerprint import text_fingerprint

PROBE_TEXT = "Distillation probe: The quick brown fox jumps over 13 lazy dogs; 7 * 6 = 42.\n  x_1 != y-2"
PROBE_TOKENS = 48  # tokens spread over the vocab whose decoded text joins the probe


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of what the tokenizer does: its token -> id map, special tokens, chat template
    and the ids of the probe text (wherever its files are)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: (item[1], item[0]))
    return text_fingerprint(json.dumps(vocab, ensure_ascii=False), json.dumps(sorted(tokenizer.all_special_tokens)),
                            str(getattr(tokenizer, "chat_template", None) or ""),
                            json.dumps(tokenizer.encode(PROBE_TEXT, add_special_tokens=False)))


def tokenizer_difference(ours: Any, theirs: Any) -> Optional[str]:
    """The first difference between the run's tokenizer (`ours`, "the student's") and the
    teacher's, in words, or None when they agree."""
    for check in (_size_difference, _special_difference, _vocab_difference, _probe_difference):
        difference = check(ours, theirs)
        if difference is not None:
            return difference
    return None


def _size_difference(ours: Any, theirs: Any) -> Optional[str]:
    if len(ours) != len(theirs):
        return f"the student's tokenizer has {len(ours)} tokens, the teacher's {len(theirs)}"
    return None


def _special_difference(ours: Any, theirs: Any) -> Optional[str]:
    """Every special token of either side (EOS, BOS, pad, unk, added ones) at one id in both."""
    for token in dict.fromkeys(list(ours.all_special_tokens) + list(theirs.all_special_tokens)):
        mine, other = ours.convert_tokens_to_ids(token), theirs.convert_tokens_to_ids(token)
        if mine != other:
            return f"special token {token!r} is id {mine} in the student's tokenizer, {other} in the teacher's"
    return None


def _vocab_difference(ours: Any, theirs: Any) -> Optional[str]:
    mine, other = ours.get_vocab(), theirs.get_vocab()
    if mine == other:
        return None
    for token, index in sorted(mine.items(), key=lambda item: item[1]):
        if other.get(token) != index:
            found = "absent" if token not in other else f"id {other[token]}"
            return f"token {token!r} is id {index} in the student's tokenizer, {found} in the teacher's"
    token = next(token for token in other if token not in mine)
    return f"token {token!r} (id {other[token]}) is in the teacher's tokenizer, not in the student's"


def probe_text(tokenizer, max_tokens: Optional[int] = None) -> str:
    """A fixed sentence and the text of tokens spread over the whole vocabulary: tokenizers
    that differ anywhere in their vocab almost surely split it differently. Cut (by
    characters, so both sides tokenize the same text) to at most `max_tokens` tokens."""
    special = set(tokenizer.all_special_ids)
    size = len(tokenizer)
    spread = [token for token in ((i * 7919) % size for i in range(1, 4 * PROBE_TOKENS)) if token not in special]
    text = PROBE_TEXT + " " + tokenizer.decode(spread[:PROBE_TOKENS], skip_special_tokens=True)
    return text if max_tokens is None else _fit(tokenizer, text, max_tokens)


def _fit(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of `text` that `tokenizer` turns into at most `max_tokens` ids
    (binary search over characters; token counts grow with the prefix)."""
    def count(length: int) -> int:
        return len(tokenizer(text[:length])["input_ids"])

    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if count(middle) <= max_tokens else (low, middle - 1)
    return text[:low]




def _probe_difference(ours: Any, theirs: Any) -> Optional[str]:
    text = probe_text(ours)
    mine = ours(text, add_special_tokens=False)["input_ids"]
    other = theirs(text, add_special_tokens=False)["input_ids"]
    if mine == other:
        return None
    first = next((i for i, (a, b) in enumerate(zip(mine, other)) if a != b), min(len(mine), len(other)))
    return (f"a probe text ({text[:50]!r}...) is {len(mine)} ids in the student's tokenizer, {len(other)} in the "
            f"teacher's, first differing at position {first}: {mine[first:first + 4]} vs {other[first:first + 4]}")
