"""The served model's HF tokenizer, for text prompts and `decoded_token` / `text` in responses.

Optional: token-id prompts need no tokenizer, so a directory without tokenizer files
serves ids only (text prompts get a 400 saying so). A directory that has tokenizer
files which do not load is an error at startup, never a silent ids-only server.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Optional, Sequence

# Any of these in a model directory means it ships a tokenizer (fast, sentencepiece, BPE).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


class HFTextCodec:
    """Encode text and decode single tokens, from the HTTP handler threads.

    Calls are serialized: a Rust-backed fast tokenizer shared by threads can fail with
    "Already borrowed". Decoded tokens are cached, since every response decodes the
    same frequent ids again.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_token_id: Optional[int] = tokenizer.eos_token_id  # a generated EOS finishes with "stop"
        self._lock = threading.Lock()
        self._decoded: dict[int, str] = {}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        with self._lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool) -> str:
        """The text of `token_ids`."""
        with self._lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def continuation(self, prompt: Sequence[int], token_ids: Sequence[int]) -> str:
        """The text `token_ids` add after `prompt`, special tokens skipped: what vLLM's incremental
        detokenizer (primed with the prompt) returns as a completion's `text`, e.g. " w5" with the
        space a word tokenizer puts between words, where decoding the token alone gives "w5"."""
        before = self.decode(prompt, skip_special_tokens=True)
        after = self.decode([*prompt, *token_ids], skip_special_tokens=True)
        return after[len(before):] if after.startswith(before) else self.decode(token_ids, skip_special_tokens=True)

    def decode_token(self, token_id: int) -> str:
        text = self._decoded.get(token_id)
        if text is None:
            with self._lock:
                text = self.tokenizer.decode([token_id])
            self._decoded[token_id] = text
        return text


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_codec(directory: Path) -> Optional[HFTextCodec]:
    """The tokenizer in `directory`, or None when it has no tokenizer files."""
    if not has_tokenizer(directory):
        return None
    from transformers import AutoTokenizer

    return HFTextCodec(AutoTokenizer.from_pretrained(str(directory)))
