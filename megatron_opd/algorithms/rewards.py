"""Reward functions for OPD-RL: `reward_funcs: [module:function, ...]`, TRL's calling convention.

Each function is called once per rollout batch with keyword arguments

    prompts=list[str], completions=list[str], completion_ids=list[list[int]], **columns

where `columns` are the dataset row's own columns (e.g. `answer`), one list entry per
completion, and returns one float per completion. A sample's reward is the sum over
the functions. A function that raises, returns the wrong number of values, or a value
that is not a finite number is an error naming the function and the dataset row:
a silent 0 would train on a wrong signal.
"""

from __future__ import annotations

import importlib
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from megatron_opd.config.errors import UserError
from megatron_opd.config.schema import ConfigError


class RewardError(UserError, RuntimeError):
    """A reward function failed or returned an unusable value."""


@dataclass(frozen=True)
class RewardFunction:
    name: str  # "module:function", as configured
    function: Callable[..., Sequence[Any]]


def load_reward_functions(specs: Sequence[str]) -> list[RewardFunction]:
    """Import every `module:function`; ConfigError naming the entry when one does not resolve."""
    functions = []
    for index, spec in enumerate(specs):
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ConfigError(f"reward_funcs[{index}]={spec!r} is invalid: write module:function, "
                              "e.g. megatron_opd.quickstart.task:addition_reward")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ConfigError(f"reward_funcs[{index}]={spec!r}: cannot import {module_name!r}: {error}") from error
        function = getattr(module, attribute, None)
        if not callable(function):
            raise ConfigError(f"reward_funcs[{index}]={spec!r}: {module_name!r} has no callable {attribute!r}")
        functions.append(RewardFunction(spec, function))
    return functions


def compute_rewards(functions: Sequence[RewardFunction], prompts: list[str], completions: list[str],
                    completion_ids: list[list[int]], columns: dict[str, list], rows: Sequence[int]
                    ) -> list[list[float]]:
    """`[len(functions)][len(completions)]` rewards; `rows`: each completion's dataset row (for errors)."""
    table = []
    for reward in functions:
        try:
            values = reward.function(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                     **columns)
        except Exception as error:
            raise RewardError(f"reward function {reward.name} raised on the batch of dataset rows "
                              f"{_rows_text(rows)}: {type(error).__name__}: {error}") from error
        try:
            values = list(values)
        except TypeError:
            raise RewardError(f"reward function {reward.name} returned {type(values).__name__}, "
                              f"expected a list of {len(completions)} floats") from None
        if len(values) != len(completions):
            raise RewardError(f"reward function {reward.name} returned {len(values)} values for "
                              f"{len(completions)} completions")
        for value, row in zip(values, rows):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise RewardError(f"reward function {reward.name} returned {value!r} for dataset row {row}: "
                                  "expected a finite number")
        table.append([float(value) for value in values])
    return table


def _rows_text(rows: Sequence[int]) -> str:
    shown = ", ".join(str(row) for row in list(rows)[:8])
    return shown + (f", ... ({len(rows)} in all)" if len(rows) > 8 else "")
