"""Tiny random Hugging Face models of each supported family, written to disk (no hub access).

Weights are redrawn from an explicit generator at scales that keep activations O(1)
(HF's own init, std 0.02, gives near-zero logits that would hide a wrong layout).
Every family has a vocab that Megatron must pad (300 -> 384 or 512) and the feature
that sets it apart: llama3 RoPE scaling, QKV bias with tied embeddings, QK-norm with a
head dim unlike hidden/heads.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6)


def family_configs() -> dict:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama2": LlamaConfig(**_COMMON, max_position_embeddings=4096, rope_theta=10000.0),
        "llama3.1": LlamaConfig(
            **_COMMON, max_position_embeddings=131072, rope_theta=10000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        "mistral": MistralConfig(**_COMMON, head_dim=16, sliding_window=None, rope_theta=1000000.0),
        "qwen2": Qwen2Config(**_COMMON, tie_word_embeddings=True, rope_theta=1000000.0),
        "qwen3": Qwen3Config(**_COMMON, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=False),
    }


def randomize(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif param.dim() == 1:  # biases
                param.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)


def make_hf_model(family: str, directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  with_tokenizer: bool = False, **config_fields) -> Path:
    """Write a random `family` model (and optionally a tokenizer) to `directory`;
    `config_fields` override the family's config (e.g. head counts)."""
    write_random_model(family_configs()[family], directory, seed, dtype, **config_fields)
    if with_tokenizer:
        make_tokenizer(directory)
    return Path(directory)


def write_random_model(config, directory: Path, seed: int, dtype: torch.dtype, **config_fields) -> None:
    """An HF model of `config` (`config_fields` overriding it) with `randomize`'s weights, saved in `dtype`."""
    from transformers import AutoModelForCausalLM

    for name, value in config_fields.items():
        setattr(config, name, value)
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.to(dtype).save_pretrained(directory)


def make_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB tokens, saved the way HF tokenizers are."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<unk>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="w0", pad_token="<unk>").save_pretrained(directory)


def hf_logits(directory: Path, token_ids: torch.Tensor) -> torch.Tensor:
    """HF transformers' float32 logits `[b, s, vocab]` for `token_ids` `[b, s]`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(token_ids).logits


def hf_prefix_logprobs(model: torch.nn.Module, sequences: list[list[int]]) -> list[list[float]]:
    """Log-prob of each token of each sequence given its prefix under a loaded HF `model`
    (its own dtype; the true vocab only)."""
    result = []
    with torch.no_grad():
        for sequence in sequences:
            logits = model(torch.tensor([sequence])).logits[0, :-1, :VOCAB]
            logprobs = torch.log_softmax(logits, dim=-1)
            result.append(logprobs.gather(1, torch.tensor(sequence[1:]).unsqueeze(1)).squeeze(1).tolist())
    return result


def hf_greedy_token(model_dir: Path, prompt: list[int], step: int) -> int:
    """The id HF's greedy decoding of `prompt` emits at `step` (an EOS that stops one row early)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    output = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            do_sample=False, max_new_tokens=step + 1, pad_token_id=0, eos_token_id=None)
    return int(output[0, len(prompt) + step])


def make_tokenizer_variant(directory: Path, *, words: int = VOCAB - 1, id_step: int = 1,
                           split_punctuation: bool = True, eos_token: str = "w0") -> None:
    """A word-level tokenizer like `make_tokenizer`'s, changed in one way, to stand for a
    teacher of another tokenizer: `words` another vocab size, `id_step` (coprime with
    `words`) the same words at other ids, `split_punctuation` False the same vocab with
    another pre-tokenizer (whitespace only: "a:" stays one word), `eos_token` another EOS
    declared over the same vocab (an instruct teacher's end-of-turn)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": (i * id_step) % words for i in range(words)} | {"<unk>": words}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace() if split_punctuation else pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos_token,
                            pad_token="<unk>").save_pretrained(directory)
