"""`ModelConfig` from an HF config.json, the refusals, and the padded vocab a teacher and student share.

Expected values come from transformers itself (the config objects, and tiny models built
from them, whose layers show the head dim, biases, QK-norm and tying HF computes with),
never from the code under test. Every supported family is read from the transformers 5
layout (`rope_parameters`) and the transformers 4 one (`rope_theta` + `rope_scaling`),
from a dict and from a saved directory.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    MixtralConfig,
    OlmoeConfig,
    Qwen2Config,
    Qwen3Config,
)

from megatron_opd.config import ConfigError, ModelConfig, ParallelConfig
from megatron_opd.config.model import with_common_padded_vocab
from megatron_opd.models.hf_config import UnsupportedModelError, hf_family, model_config_from_hf, read_hf_config
from megatron_opd.testing import run_distributed
from tests.hf_models import family_configs, hf_logits, randomize
from tests.tiny_models import scaled_diff

# Every dimension distinct, so a swapped field shows; eps unlike the reader's 1e-6 default.
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
LLAMA3 = {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
LAYOUTS = ["transformers5", "transformers4_type", "transformers4_rope_type"]
SUPPORTED_ARCHITECTURES = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]


def hf_config_objects() -> dict:
    """One config per family, each with the feature that sets it apart."""
    return {
        "llama2": LlamaConfig(**SMALL, rope_theta=10000.0),
        "llama3.1": LlamaConfig(**SMALL, rope_theta=500000.0, rope_scaling=dict(LLAMA3),
                                max_position_embeddings=131072, tie_word_embeddings=True),
        "mistral": MistralConfig(**SMALL, head_dim=24, sliding_window=None, rope_theta=1000000.0),
        "qwen2": Qwen2Config(**SMALL, tie_word_embeddings=True, rope_theta=1000000.0),
        "qwen3": Qwen3Config(**SMALL, head_dim=32, rope_theta=5000000.0, tie_word_embeddings=False),
    }


def with_layout(config_dict: dict, layout: str) -> dict:
    """`config_dict` (transformers 5 layout) as `layout` writes it.

    Transformers 4 kept `rope_theta` and `rope_scaling` (its type under "type" in early
    versions, "rope_type" later) at the top level and wrote no `layer_types`.
    """
    if layout == "transformers5":
        return dict(config_dict)
    converted = dict(config_dict)
    rope = dict(converted.pop("rope_parameters"))
    converted.pop("layer_types", None)
    converted["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    type_key = "type" if layout == "transformers4_type" else "rope_type"
    converted["rope_scaling"] = None if rope_type == "default" else {type_key: rope_type, **rope}
    return converted


def hf_dict(config, layout: str = "transformers5", **changes) -> dict:
    """The config.json dict of an HF config object, architectures set as save_pretrained leaves them."""
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    return {**with_layout(config.to_dict(), layout), **changes}


@pytest.fixture(scope="module")
def expected() -> dict:
    """Per family: what the HF model built from the config computes with."""
    expected = {}
    for family, config in hf_config_objects().items():
        model = AutoModelForCausalLM.from_config(config)
        attention = model.model.layers[0].self_attn
        rope = config.rope_parameters
        expected[family] = dict(
            architecture=type(model).__name__,
            num_layers=len(model.model.layers),
            hidden_size=model.model.embed_tokens.embedding_dim,
            num_attention_heads=attention.q_proj.out_features // attention.head_dim,
            num_query_groups=attention.k_proj.out_features // attention.head_dim,
            kv_channels=attention.head_dim,
            ffn_hidden_size=model.model.layers[0].mlp.gate_proj.out_features,
            vocab_size=model.model.embed_tokens.num_embeddings,
            norm_epsilon=model.model.norm.variance_epsilon,
            rotary_base=float(rope["rope_theta"]),
            rope_scaling_factor=float(rope["factor"]) if rope["rope_type"] == "llama3" else None,
            add_qkv_bias=attention.q_proj.bias is not None,
            qk_layernorm=hasattr(attention, "q_norm"),
            tie_word_embeddings=model.lm_head.weight is model.model.embed_tokens.weight,
        )
    return expected


def assert_matches(model_config: ModelConfig, expected: dict) -> None:
    for field, value in expected.items():
        if field != "architecture":
            assert getattr(model_config, field) == value, (field, getattr(model_config, field), value)
    assert isinstance(model_config.rotary_base, float) and isinstance(model_config.norm_epsilon, float)


def test_expectations_cover_every_distinguishing_feature(expected):
    """The fixture must make each field matter: otherwise a reader that ignores it would pass."""
    assert {e["kv_channels"] for e in expected.values()} == {16, 24, 32}
    assert expected["mistral"]["kv_channels"] != SMALL["hidden_size"] // SMALL["num_attention_heads"]
    assert [f for f, e in expected.items() if e["add_qkv_bias"]] == ["qwen2"]
    assert [f for f, e in expected.items() if e["qk_layernorm"]] == ["qwen3"]
    assert [f for f, e in expected.items() if e["rope_scaling_factor"] is not None] == ["llama3.1"]
    assert {e["tie_word_embeddings"] for e in expected.values()} == {True, False}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", list(hf_config_objects()))
def test_model_config_from_hf_dict(expected, family, layout):
    config = hf_config_objects()[family]
    data = hf_dict(config, layout)
    # The older layout must mean the same thing to transformers, or the test proves nothing.
    reread = type(config).from_dict(data).rope_parameters
    assert {k: v for k, v in reread.items() if k != "type"} == config.rope_parameters
    assert hf_family(data).architecture == expected[family]["architecture"]
    model_config = model_config_from_hf(data)
    assert_matches(model_config, expected[family])
    if expected[family]["rope_scaling_factor"] is not None:
        assert isinstance(model_config.rope_scaling_factor, float)  # the JSON holds the int 8


@pytest.mark.parametrize("family", list(hf_config_objects()))
def test_model_config_from_saved_directory(expected, family, tmp_path):
    """What save_pretrained writes (it leaves out some keys), read from the directory or the file."""
    config = hf_config_objects()[family]
    config.save_pretrained(tmp_path)
    assert read_hf_config(tmp_path) == json.loads((tmp_path / "config.json").read_text())
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        assert_matches(model_config_from_hf(source), expected[family])


def test_read_hf_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_hf_config(tmp_path)
    with pytest.raises(ConfigError):
        model_config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        model_config_from_hf(tmp_path)


def test_neutral_values_are_accepted():
    """Values that mean 'off' or 'the same function' under another spelling."""
    data = hf_dict(LlamaConfig(**SMALL), partial_rotary_factor=None, hidden_act="swish")
    assert model_config_from_hf(data).num_layers == SMALL["num_hidden_layers"]
    # Qwen windows only layers from max_window_layers on: none when it covers every layer.
    qwen = hf_dict(Qwen2Config(**SMALL), "transformers4_rope_type", use_sliding_window=True,
                   sliding_window=4096, max_window_layers=SMALL["num_hidden_layers"])
    assert model_config_from_hf(qwen).num_layers == SMALL["num_hidden_layers"]


def test_llama3_scaling_without_factor_is_a_config_error():
    data = hf_dict(LlamaConfig(**SMALL), rope_parameters={"rope_type": "llama3", "rope_theta": 5e5})
    with pytest.raises(ConfigError, match="factor"):
        model_config_from_hf(data)


def test_unsupported_model_error_is_a_config_error():
    """Callers that report config errors report these too."""
    assert issubclass(UnsupportedModelError, ConfigError)


def llama3_with(**changes) -> LlamaConfig:
    return LlamaConfig(**SMALL, rope_scaling={**LLAMA3, **changes}, max_position_embeddings=131072)


# (id, config.json dict, substrings the message must hold). Each changes what HF computes.
REFUSALS = [
    ("mistral_sliding_window", lambda: hf_dict(MistralConfig(**SMALL, sliding_window=4096)),
     ["sliding_window=4096"]),
    ("qwen2_sliding_layers", lambda: hf_dict(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4096,
                                                         max_window_layers=1)),
     ["layer_types", "sliding_attention"]),
    ("qwen2_sliding_window_t4", lambda: hf_dict(Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=4096,
                                                            max_window_layers=1), "transformers4_rope_type"),
     ["sliding_window=4096"]),
    ("qwen3_sliding_layers", lambda: hf_dict(Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=512,
                                                         max_window_layers=2)),
     ["layer_types", "sliding_attention"]),
    ("llama_layer_types", lambda: hf_dict(LlamaConfig(**SMALL),
                                          layer_types=["full_attention", "sliding_attention", "full_attention"]),
     ["layer_types", "sliding_attention"]),
    ("rope_yarn", lambda: hf_dict(LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})), ["rope_type", "'yarn'"]),
    ("rope_yarn_t4", lambda: hf_dict(LlamaConfig(**SMALL, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}), "transformers4_type"),
     ["rope_type", "'yarn'"]),
    ("rope_linear", lambda: hf_dict(LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0})),
     ["rope_type", "'linear'"]),
    ("rope_linear_t4", lambda: hf_dict(LlamaConfig(**SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}),
                                       "transformers4_rope_type"), ["rope_type", "'linear'"]),
    ("llama3_low_freq_factor", lambda: hf_dict(llama3_with(low_freq_factor=2.0)), ["low_freq_factor", "2.0"]),
    ("llama3_original_context", lambda: hf_dict(llama3_with(original_max_position_embeddings=4096),
                                                "transformers4_type"),
     ["original_max_position_embeddings", "4096"]),
    ("gelu", lambda: hf_dict(LlamaConfig(**SMALL, hidden_act="gelu")), ["hidden_act='gelu'"]),
    ("llama_attention_bias", lambda: hf_dict(LlamaConfig(**SMALL, attention_bias=True)), ["attention_bias=True"]),
    ("qwen3_attention_bias", lambda: hf_dict(Qwen3Config(**SMALL, attention_bias=True)), ["attention_bias=True"]),
    ("mlp_bias", lambda: hf_dict(LlamaConfig(**SMALL, mlp_bias=True)), ["mlp_bias=True"]),
    # Qwen2-MoE and Mixtral are supported (tests/test_moe_hf_config.py); OLMoE is not.
    ("olmoe", lambda: hf_dict(OlmoeConfig()), ["model_type='olmoe'", *SUPPORTED_ARCHITECTURES]),
    ("mixtral_jitter", lambda: hf_dict(MixtralConfig(router_jitter_noise=0.1)), ["router_jitter_noise=0.1"]),
    ("gemma", lambda: hf_dict(GemmaConfig()), ["model_type='gemma'", *SUPPORTED_ARCHITECTURES]),
    ("architecture_mismatch",
     lambda: hf_dict(LlamaConfig(**SMALL), architectures=["LlamaForSequenceClassification"]),
     ["LlamaForSequenceClassification", "LlamaForCausalLM"]),
    ("family_mismatch", lambda: hf_dict(LlamaConfig(**SMALL), architectures=["MistralForCausalLM"]),
     ["MistralForCausalLM", "'llama'"]),
    ("unhandled_experts", lambda: hf_dict(LlamaConfig(**SMALL), num_experts=8), ["num_experts=8"]),
    ("partial_rotary", lambda: hf_dict(LlamaConfig(**SMALL), partial_rotary_factor=0.5),
     ["partial_rotary_factor=0.5"]),
]


@pytest.mark.parametrize("make,message", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_refuses_what_it_cannot_reproduce(make, message):
    with pytest.raises(UnsupportedModelError) as raised:
        model_config_from_hf(make())
    for part in message:
        assert part in str(raised.value), (part, str(raised.value))


@pytest.mark.parametrize("config,layout,changes", [
    # Qwen2 as transformers 5 writes it: sliding window off, max_window_layers set, all layers full.
    (Qwen2Config(**SMALL), "transformers5", {}),
    # Qwen2.5-7B's own config.json: a sliding_window value that use_sliding_window=false turns
    # off (transformers 5 would drop it, so it is set in the dict).
    (Qwen2Config(**SMALL, max_window_layers=28), "transformers4_rope_type", {"sliding_window": 131072}),
    (Qwen3Config(**SMALL), "transformers4_rope_type", {"sliding_window": 4096}),
], ids=["qwen2_t5_default", "qwen2.5_t4", "qwen3_t4"])
def test_accepts_window_fields_that_are_off(config, layout, changes):
    data = hf_dict(config, layout, **changes)
    assert data.get("use_sliding_window") is False
    assert model_config_from_hf(data).num_layers == SMALL["num_hidden_layers"]


@pytest.mark.parametrize("field", ["hidden_size", "num_hidden_layers", "num_attention_heads",
                                   "intermediate_size", "vocab_size"])
def test_missing_required_field_is_named(field):
    data = hf_dict(LlamaConfig(**SMALL))
    del data[field]
    with pytest.raises(ConfigError, match=repr(field)):
        model_config_from_hf(data)


def tiny(vocab_size: int, **fields) -> ModelConfig:
    return ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=96,
                       vocab_size=vocab_size, **fields)


@pytest.mark.parametrize("vocab,tp,divisible_by,padded", [
    (151936, 1, 128, 151936),  # Qwen2.5-0.5B: already a multiple of 128
    (151936, 2, 128, 152064),  # 1187 * 128 is odd, so TP=2 needs one more block of 128
    (152064, 4, 128, 152064),  # Qwen2.5-7B: 297 * 512
    (300, 1, 128, 384),
    (300, 2, 128, 512),
    (32000, 8, 128, 32768),
    (250, 2, 64, 256),
])
def test_default_padding_rounds_up_to_divisible_by_times_tp(vocab, tp, divisible_by, padded):
    assert tiny(vocab, make_vocab_size_divisible_by=divisible_by).padded_vocab_size(tp) == padded
    assert model_config_from_hf(hf_dict(Qwen2Config(**{**SMALL, "vocab_size": vocab})),
                                make_vocab_size_divisible_by=divisible_by).padded_vocab_size(tp) == padded


def test_default_padding_is_the_smallest_multiple():
    for vocab in range(1, 1200, 7):
        for tp in (1, 2, 4):
            multiple = 64 * tp
            assert tiny(vocab, make_vocab_size_divisible_by=64).padded_vocab_size(tp) == \
                math.ceil(vocab / multiple) * multiple, (vocab, tp)


def test_pad_vocab_size_to_overrides_rounding():
    config = tiny(300, pad_vocab_size_to=1024)
    assert [config.padded_vocab_size(tp) for tp in (1, 2, 4)] == [1024] * 3
    assert model_config_from_hf(hf_dict(LlamaConfig(**SMALL)), pad_vocab_size_to=1536).padded_vocab_size(2) == 1536


def test_pad_vocab_size_to_below_vocab_is_refused():
    """Fewer rows than tokens would drop real tokens, wherever the size comes from."""
    for make in (lambda: tiny(300, pad_vocab_size_to=299),
                 lambda: dataclasses.replace(tiny(300), pad_vocab_size_to=256),
                 lambda: model_config_from_hf(hf_dict(LlamaConfig(**SMALL)), pad_vocab_size_to=999)):
        with pytest.raises(ConfigError, match="model.pad_vocab_size_to"):
            make()


def test_pad_vocab_size_to_must_split_over_tp():
    config = tiny(300, pad_vocab_size_to=302)
    assert config.padded_vocab_size(1) == 302 and config.padded_vocab_size(2) == 302
    with pytest.raises(ConfigError, match="model.pad_vocab_size_to=302 .*tensor_model_parallel_size=4"):
        config.padded_vocab_size(4)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_common_padded_vocab_of_teacher_and_student(tp):
    """Qwen2.5-7B (152064) and 0.5B (151936): one padded size, valid for both at this TP."""
    configs = [model_config_from_hf(hf_dict(Qwen2Config(**{**SMALL, "vocab_size": vocab})))
               for vocab in (152064, 151936)]
    own = [math.ceil(c.vocab_size / (128 * tp)) * 128 * tp for c in configs]
    common = with_common_padded_vocab(configs, tp)
    sizes = {c.padded_vocab_size(tp) for c in common}
    assert len(sizes) == 1
    (size,) = sizes
    assert size == max(own) and size % tp == 0 and all(size >= o for o in own)
    assert [c.vocab_size for c in common] == [152064, 151936]
    assert [c.pad_vocab_size_to for c in common] == [size, size]
    assert [c.pad_vocab_size_to for c in configs] == [None, None], "the inputs must be left as they were"


# --- two HF models of different vocab sizes, padded alike, at TP=2 -------------------------

SHARED_VOCAB = {"qwen2": 300, "llama2": 600}  # own padding at TP=2: 512 and 768; tied and untied
SEQ_LENGTH = 24


def make_hf_model_with_vocab(family: str, vocab_size: int, directory, seed: int):
    config = family_configs()[family]
    config.vocab_size = vocab_size
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    model.save_pretrained(directory)
    return directory


def padded_logits_on_rank(directories: dict, common: int, tokens: dict) -> dict:
    """Per model: its padded vocab, the local logits width, and the gathered logits on TP rank 0."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_opd.checkpoint import load_pretrained
    from megatron_opd.runtime import initialize_runtime
    from megatron_opd.pipeline import lm_forward_backward

    runtime = initialize_runtime(ParallelConfig(tensor_model_parallel_size=2))
    report = {}
    for name, directory in directories.items():
        model = load_pretrained(directory, runtime, role="teacher", pad_vocab_size_to=common)
        captured = []

        def keep(logits, captured=captured):
            captured.append((logits.shape[-1], gather_from_tensor_model_parallel_region(logits).detach().clone()))

        lm_forward_backward(model, tokens[name][None], forward_only=True, on_logits=keep)
        local_width, logits = captured[0]
        report[name] = {"vocab_size": model.vocab_size, "local_width": local_width,
                        "logits": logits if parallel_state.get_tensor_model_parallel_rank() == 0 else None}
    return report


def test_models_of_different_vocab_share_padding_and_match_hf(tmp_path):
    from megatron_opd.checkpoint import inspect_pretrained

    directories = {name: make_hf_model_with_vocab(name, vocab, tmp_path / name, seed)
                   for seed, (name, vocab) in enumerate(SHARED_VOCAB.items())}
    configs = [inspect_pretrained(directories[name]).model for name in SHARED_VOCAB]
    assert [c.vocab_size for c in configs] == list(SHARED_VOCAB.values())
    common = with_common_padded_vocab(configs, 2)[0].pad_vocab_size_to
    assert common == 768 and configs[0].padded_vocab_size(2) == 512, "the smaller model must be padded further"
    generator = torch.Generator().manual_seed(3)
    tokens = {name: torch.randint(0, vocab, (1, SEQ_LENGTH + 1), generator=generator)
              for name, vocab in SHARED_VOCAB.items()}
    results = run_distributed(padded_logits_on_rank, 2, directories, common, tokens, timeout=240)
    for name, vocab in SHARED_VOCAB.items():
        assert [r[name]["vocab_size"] for r in results] == [common, common], name
        assert [r[name]["local_width"] for r in results] == [common // 2] * 2, name
        logits = results[0][name]["logits"]
        assert logits.shape == (1, SEQ_LENGTH, common), name
        expected = hf_logits(directories[name], tokens[name][:, :-1])
        assert expected.shape[-1] == vocab and expected.abs().max() > 3.0, name
        diff = scaled_diff(logits[..., :vocab], expected)
        assert diff < 1e-4, f"{name}: scaled logit diff {diff:.2e}"
