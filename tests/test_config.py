"""Config loading fails early, naming the field, the value and what is allowed."""

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from megatron_opd.config import ConfigError, ModelConfig, ParallelConfig, from_dict

TINY = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
        "ffn_hidden_size": 128, "vocab_size": 1000}


@dataclass
class Run:
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    model: Optional[ModelConfig] = None
    mode: Literal["gkd", "opd_rl"] = "gkd"
    steps: list[int] = field(default_factory=list)


def test_loads_nested_typed_config():
    run = from_dict(Run, {"parallel": {"tensor_model_parallel_size": 2}, "model": TINY,
                          "mode": "opd_rl", "steps": [1, 2]})
    assert run.parallel.tensor_model_parallel_size == 2 and run.model.hidden_size == 64
    assert isinstance(run.model.norm_epsilon, float)


@pytest.mark.parametrize("data,message", [
    ({"parallel": {"tensor_parallel": 2}}, "unknown key(s) parallel.tensor_parallel; allowed: "),
    ({"parallel": {"seed": "1"}}, "parallel.seed='1' is invalid: an integer"),
    ({"parallel": {"sequence_parallel": 1}}, "parallel.sequence_parallel=1 is invalid: true or false"),
    ({"parallel": {"tensor_model_parallel_size": True}}, "an integer"),
    ({"mode": "sft"}, "mode='sft' is invalid: one of ['gkd', 'opd_rl']"),
    ({"steps": [1, "x"]}, "steps[1]='x' is invalid"),
    ({"model": {**TINY, "rotary_base": "1e6"}}, "model.rotary_base='1e6' is invalid: a number"),
    ({"model": {"num_layers": 2}}, "missing required key model.hidden_size"),
])
def test_errors_name_the_dotted_field(data, message):
    with pytest.raises(ConfigError) as error:
        from_dict(Run, data)
    assert message in str(error.value)


@pytest.mark.parametrize("overrides,field_name", [
    ({"num_query_groups": 3}, "model.num_query_groups"),
    ({"hidden_size": 66}, "model.hidden_size"),
    ({"norm_epsilon": 0.0}, "model.norm_epsilon"),
    ({"hidden_dropout": 1.0}, "model.hidden_dropout"),
    ({"num_layers": 0}, "model.num_layers"),
])
def test_model_ranges(overrides, field_name):
    with pytest.raises(ConfigError, match=field_name.replace(".", r"\.")):
        ModelConfig(**{**TINY, **overrides})


def test_parallel_ranges_and_world_size():
    with pytest.raises(ConfigError, match="parallel.sequence_parallel.*tensor_model_parallel_size > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="parallel.pipeline_model_parallel_size=0"):
        ParallelConfig(pipeline_model_parallel_size=0)
    layout = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert layout.data_parallel_size(8) == 2
    with pytest.raises(ConfigError, match="a divisor of the world size 6"):
        layout.data_parallel_size(6)


def test_model_must_split_over_the_layout():
    model = ModelConfig(**{**TINY, "num_query_groups": 2, "num_layers": 3})
    with pytest.raises(ConfigError, match="model.num_query_groups=2 .*tensor_model_parallel_size=4"):
        model.check_parallel(ParallelConfig(tensor_model_parallel_size=4))
    with pytest.raises(ConfigError, match="model.num_layers=3 .*pipeline_model_parallel_size=2"):
        model.check_parallel(ParallelConfig(pipeline_model_parallel_size=2))


@pytest.mark.parametrize("vocab,divisible_by,tp", [(151936, 128, 1), (151646, 128, 2), (32000, 64, 8), (7, 1, 4)])
def test_padded_vocab(vocab, divisible_by, tp):
    model = ModelConfig(**{**TINY, "vocab_size": vocab, "make_vocab_size_divisible_by": divisible_by})
    padded = model.padded_vocab_size(tp)
    assert padded == math.ceil(vocab / (divisible_by * tp)) * divisible_by * tp
    assert padded >= vocab and padded % tp == 0
