"""Reward functions: loading `module:function`, and every unusable result rejected by name."""

from __future__ import annotations

import pytest

from megatron_opd.algorithms.rewards import RewardError, compute_rewards, load_reward_functions
from megatron_opd.config.schema import ConfigError


def call(name: str, completions=("a", "bb", "c")):
    functions = load_reward_functions([f"tests.reward_functions:{name}"])
    ids = [[1] * len(text) for text in completions]
    return compute_rewards(functions, ["p"] * len(completions), list(completions), ids,
                           {"answer": ["x"] * len(completions)}, rows=[10, 11, 12][:len(completions)])


def test_rewards_of_several_functions_in_order():
    functions = load_reward_functions(["tests.reward_functions:completion_length",
                                       "tests.reward_functions:first_id_parity"])
    table = compute_rewards(functions, ["p", "q"], ["ab", "c"], [[3, 4], [6]], {}, rows=[0, 1])
    assert table == [[2.0, 1.0], [1.0, 0.0]]


@pytest.mark.parametrize("spec, message", [
    ("tests.reward_functions", "write module:function"),
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("tests.reward_functions:missing", "has no callable 'missing'"),
])
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message) as error:
        load_reward_functions(["tests.reward_functions:completion_length", spec])
    assert "reward_funcs[1]" in str(error.value)


@pytest.mark.parametrize("name, message", [
    ("raises", r"tests.reward_functions:raises raised on the batch of dataset rows 10, 11, 12: KeyError"),
    ("nan_on_second", r"tests.reward_functions:nan_on_second returned nan for dataset row 11"),
    ("too_few", r"returned 1 values for 3 completions"),
])
def test_unusable_rewards_name_function_and_row(name, message):
    with pytest.raises(RewardError, match=message):
        call(name)
