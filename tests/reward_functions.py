"""Reward functions for the OPD-RL tests, importable as tests.reward_functions:NAME."""

from __future__ import annotations

import math


def completion_length(prompts, completions, completion_ids, **columns):
    """A reward that differs between samples: the number of sampled ids."""
    return [float(len(ids)) for ids in completion_ids]


def first_id_parity(prompts, completions, completion_ids, **columns):
    return [float(ids[0] % 2) if ids else 0.0 for ids in completion_ids]


def raises(prompts, completions, completion_ids, **columns):
    raise KeyError("no such column")


def nan_on_second(prompts, completions, completion_ids, **columns):
    return [math.nan if i == 1 else 1.0 for i in range(len(completions))]


def too_few(prompts, completions, completion_ids, **columns):
    return [1.0]


def echo_columns(prompts, completions, completion_ids, **columns):
    """Fails unless the rows' own columns arrive, one value per completion."""
    assert set(columns) >= {"prompt", "completion"}, sorted(columns)
    assert all(len(values) == len(completions) for values in columns.values())
    return [0.0] * len(completions)
