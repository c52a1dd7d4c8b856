"""Several teachers in one run (`teachers:`), each row routed by its `teacher` column.

Two teachers of other weights (and, for b, another temperature and top-K), one student,
rows of both teachers mixed inside each microbatch: one SGD step at lr=1 (the update is
the gradient) at TP=1, TP=2 and PP=2 against a float64 reference that computes each row
against its own teacher densely in one process (HF transformers), routed by the data file's
own column (`tests.helpers.multi_teacher`). Per-teacher metrics add up to the global ones.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from megatron_opd.checkpoint.run_models import resolve_models
from megatron_opd.config.job import load_job_config
from megatron_opd.config.schema import ConfigError
from megatron_opd.serve.launch import start_server
from megatron_opd.teachers.routing import route_rows
from megatron_opd.testing import run_distributed
from tests.gkd_setup import overrides
from tests.helpers.multi_teacher import (
    evaluate_on_rank,
    gkd_reference,
    make_two_teacher_setup,
    merged,
    offload_counts_on_rank,
    opd_rl_reference,
    rows_seen_on_rank,
    served_copy,
    start_error_on_rank,
    teachers_field,
    train_and_save_on_rank,
    train_on_rank,
)
from tests.helpers.teacher_runs import SERVER_ENV, cache_on_rank
from tests.helpers.trainer_runs import SGD, assert_same_update
from tests.hf_models import VOCAB, make_hf_model, make_tokenizer_variant
from tests.kd_hf_reference import megatron_to_hf_names
from tests.tiny_models import relative_error

LAYOUTS = {"tp1": {"world": 1}, "tp2": {"world": 2, "parallel.tensor_model_parallel_size": 2},
           "pp2": {"world": 2, "parallel.pipeline_model_parallel_size": 2},
           # DP ranks with their own teachers' rows; microbatches of several shapes by a token
           # budget, split by teacher into sub-microbatches of yet other shapes, under PP
           "dp2": {"world": 2}, "pp2_budget": {"world": 2, "parallel.pipeline_model_parallel_size": 2,
                                               "training.max_tokens_per_microbatch": 48},
           # packed rows holding both teachers' examples: each teacher runs on its examples re-packed
           "packed": {"world": 1, "training.max_tokens_per_microbatch": 48, "training.pack_sequences": True}}
CORE = ["tp1", "tp2", "pp2"]
B_TEMPERATURE, RUN_TEMPERATURE = 0.7, 1.0
GRAD_RTOL = 5e-5  # float32 trainer vs float64 reference, per tensor relative to its largest entry


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_two_teacher_setup(tmp_path_factory.mktemp("multi_teacher"))


def run(setup: dict, out, layout: str, **fields) -> dict:
    fields = {**SGD, **LAYOUTS[layout], "teacher_model": "null", "training.micro_batch_size": 4, **fields}
    world = fields.pop("world")
    return merged(run_distributed(train_on_rank, world, overrides(setup, out, **fields), 1, timeout=300))


def assert_gradients_match(result: dict, reference_grads: dict) -> None:
    for megatron, hf in megatron_to_hf_names().items():
        grad = result["grads"][megatron]
        grad = grad[:VOCAB] if megatron.startswith("embedding") else grad
        error = relative_error(grad, reference_grads[hf])
        assert error < GRAD_RTOL, f"{megatron}: {error:.3g}"


def assert_routed_and_mixed(setup: dict, examples: list[dict]) -> None:
    names = ["a", "b"]
    for example in examples:
        assert names[example["_teacher"]] == setup["routes"][example["_row"]]
    assert {setup["routes"][example["_row"]] for example in examples} == {"a", "b"}


def assert_per_teacher_sums(step: dict, metric: str) -> None:
    assert step["tokens/a"] + step["tokens/b"] == step["tokens"]
    # the global sum is float32 (the loss dtype), the per-teacher ones float64
    assert step[f"{metric}/a"] + step[f"{metric}/b"] == pytest.approx(step[metric], rel=1e-6)
    for name in ("a", "b"):
        mean = step[f"{metric}/{name}"] * step["tokens"] / step[f"tokens/{name}"]
        assert step[f"{metric}_mean/{name}"] == pytest.approx(mean, rel=1e-9)


@pytest.mark.parametrize("topk, layout", [(None, layout) for layout in LAYOUTS] + [(5, layout) for layout in CORE],
                         ids=[f"full_vocab-{layout}" for layout in LAYOUTS] + [f"topk-{layout}" for layout in CORE])
def test_gkd_step_against_each_rows_teacher(setup, tmp_path, layout, topk):
    """GKD (beta 0.5): b at temperature 0.7 and (top-K) its own K=3, a the run's; micro_batch 4
    of a shuffled batch of 8, so microbatches hold rows of both teachers."""
    b = {"temperature": B_TEMPERATURE, **({"gkd_logits_topk": 3} if topk else {})}
    result = run(setup, tmp_path / "out", layout, teachers=teachers_field(setup, b=b),
                 gkd_logits_topk="null" if topk is None else topk, temperature=RUN_TEMPERATURE)
    step, examples = result["steps"][0], result["examples"]
    assert_routed_and_mixed(setup, examples)
    teachers = {"a": {"dir": setup["teacher"], "temperature": RUN_TEMPERATURE, "topk": topk},
                "b": {"dir": setup["teacher_b"], "temperature": B_TEMPERATURE, "topk": 3 if topk else None}}
    reference = gkd_reference(setup["student"], teachers, setup["routes"], examples, beta=0.5)
    assert step["tokens"] == reference["tokens"]
    assert step["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for name in ("a", "b"):
        assert step[f"tokens/{name}"] == reference["teacher_tokens"][name]
        assert step[f"divergence/{name}"] == pytest.approx(reference["divergence"][name], rel=1e-5)
    assert_per_teacher_sums(step, "divergence")
    assert_gradients_match(result, reference["grads"])


OPD_RL = {"algorithm": "opd_rl", "num_generations": 2, "max_completion_length": 5, "temperature": 1.2,
          "teacher_kl_coef": 0.5, "training.micro_batch_size": 2}


@pytest.mark.parametrize("layout", CORE)
def test_opd_rl_step_against_each_rows_teacher(setup, tmp_path, layout):
    """OPD-RL without rewards: each sampled token's log-ratio against its prompt's teacher
    (b at temperature 0.7, the student and a at the run's 1.2)."""
    result = run(setup, tmp_path / "out", layout, teachers=teachers_field(setup, b={"temperature": B_TEMPERATURE}),
                 **OPD_RL)
    step, examples = result["steps"][0], result["examples"]
    assert_routed_and_mixed(setup, examples)
    teachers = {"a": {"dir": setup["teacher"], "temperature": OPD_RL["temperature"]},
                "b": {"dir": setup["teacher_b"], "temperature": B_TEMPERATURE}}
    reference = opd_rl_reference(setup["student"], teachers, setup["routes"], examples,
                                 temperature=OPD_RL["temperature"], teacher_kl_coef=OPD_RL["teacher_kl_coef"])
    assert step["tokens"] == reference["tokens"]
    assert step["loss"] == pytest.approx(reference["loss"], rel=1e-5, abs=1e-7)
    for name in ("a", "b"):
        assert step[f"tokens/{name}"] == reference["teacher_tokens"][name]
        assert step[f"teacher_kl/{name}"] == pytest.approx(reference["teacher_kl"][name], rel=1e-5, abs=1e-8)
    assert_per_teacher_sums(step, "teacher_kl")
    assert_per_teacher_sums(step, "loss")
    assert_gradients_match(result, reference["grads"])


def test_each_teacher_runs_only_on_its_rows(setup, tmp_path):
    """No teacher forwards another's rows: in mixed microbatches each sees exactly its own."""
    argv = overrides(setup, tmp_path / "out", **{**SGD, "teacher_model": "null", "training.micro_batch_size": 4,
                                                 "teachers": teachers_field(setup)})
    (result,) = run_distributed(rows_seen_on_rank, 1, argv, timeout=300)
    for name in ("a", "b"):
        expected = sorted(row for row in result["rows"] if setup["routes"][row] == name)
        assert sorted(result["seen"][name]) == expected and expected, name


def test_unknown_teacher_in_a_row_is_named_or_skipped(setup, tmp_path):
    """A row naming a teacher the run lacks: the error names the row, its value and the known
    teachers; with data.skip_bad_rows the rows are dropped and counted; rows without a value
    take default_teacher."""
    base = {"teacher_model": "null", "teachers": json.dumps([{"name": "a", "model": setup["teacher"]},
                                                             {"name": "c", "model": setup["teacher_b"]}])}
    (message,) = run_distributed(start_error_on_rank, 1, overrides(setup, tmp_path / "x", **base), timeout=300)
    first_b = setup["routes"].index("b")
    assert re.search(rf"row {first_b}: teacher='b' is not a teacher of this run \(known: \['a', 'c'\]\)", message)
    assert "data.skip_bad_rows" in message
    skipped = overrides(setup, tmp_path / "y", **base, **{"data.skip_bad_rows": "true"})
    (message,) = run_distributed(start_error_on_rank, 1, skipped, timeout=300)
    assert message == ""
    # No teacher column at all: every row takes default_teacher, or the start names the column.
    untagged = overrides(setup, tmp_path / "z", **base, teacher_column="domain")
    (message,) = run_distributed(start_error_on_rank, 1, untagged, timeout=300)
    assert "row 0 has no 'domain' value and default_teacher is null" in message
    (message,) = run_distributed(start_error_on_rank, 1, [*untagged, "default_teacher=c"], timeout=300)
    assert message == ""


def test_route_rows_counts_unknown_rows():
    routes, unknown = route_rows(["a", None, "x", "b", 3], ["a", "b"], "b", "teacher", "data")
    assert routes == [0, 1, -1, 1, -1] and unknown == [2, 4]


def test_bad_teacher_configs_are_refused_by_name(setup, tmp_path):
    def load(**fields):
        return load_job_config(None, overrides(setup, tmp_path, **{"teacher_model": "null", **fields}), world_size=1)

    cases = [
        ([{"name": "a"}], r"teachers\[0\]='a' is invalid: exactly one source: set one of teachers\[0\].model, "
                          r"teachers\[0\].server or teachers\[0\].cache \(it sets none\)"),
        ([{"name": "a", "model": "m", "server": "http://h:1"}], r"exactly one source.*it sets \['model', 'server'\]"),
        ([{"name": "a", "model": "m"}, {"name": "a", "model": "n"}], r"teachers\[1\].name='a' is invalid"),
        ([{"name": "a b", "model": "m"}], r"teachers\[0\].name='a b' is invalid"),
        ([{"name": "a", "server": "h:1"}], r"teachers\[0\].server='h:1' is invalid: an http"),
        ([{"name": "a", "server": "http://h:1"}], r"teachers\[0\].gkd_logits_topk=None is invalid"),
        ([{"name": "a", "model": "m", "temperature": 0}], r"teachers\[0\].temperature=0.0 is invalid"),
    ]
    for teachers, message in cases:
        with pytest.raises(ConfigError, match=message):
            load(teachers=json.dumps(teachers))
    with pytest.raises(ConfigError, match=r"teacher_model='m' is invalid: null when teachers is set"):
        load(teachers=json.dumps([{"name": "a", "model": "n"}]), teacher_model="m")
    with pytest.raises(ConfigError, match=r"default_teacher='z' is invalid: one of the teachers' names \['a'\]"):
        load(teachers=json.dumps([{"name": "a", "model": "n"}]), default_teacher="z")
    with pytest.raises(ConfigError, match=r"seq_kd=True is invalid: false with several teachers"):
        load(teachers=json.dumps([{"name": "a", "model": "n"}, {"name": "b", "model": "n"}]), seq_kd="true")
    # The single-teacher fields are the one-teacher case of the same list.
    config = load(teacher_model=setup["teacher"])
    assert [(spec.name, spec.model) for spec in config.teacher_list()] == [("teacher", setup["teacher"])]


def test_teacher_of_another_tokenizer_is_refused_by_name(setup, tmp_path):
    """A teacher whose own tokenizer differs from the run's fails at start naming its entry."""
    other = tmp_path / "other_tokenizer_teacher"
    shutil.copytree(setup["teacher"], other)
    make_tokenizer_variant(other, id_step=7)
    teachers = json.dumps([{"name": "a", "model": setup["teacher"]}, {"name": "b", "model": str(other)}])
    config = load_job_config(None, overrides(setup, tmp_path / "out", teacher_model="null", teachers=teachers))
    with pytest.raises(ConfigError, match=rf"teachers\[1\].model={re.escape(str(other))} is invalid: its tokenizer"):
        resolve_models(config)


@pytest.fixture(scope="module")
def server_b(setup, tmp_path_factory):
    directory = served_copy(setup["teacher_b"], setup["tokenizer"], tmp_path_factory.mktemp("served") / "b")
    with start_server(directory, max_logprobs=8, env=SERVER_ENV, args=["--tokenizer", setup["tokenizer"]]) as server:
        yield server


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_in_process_and_served_teachers_in_one_run(setup, server_b, tmp_path, layout):
    """Teacher a in process (full vocab), teacher b served by `serve-teacher` (top-5 at
    temperature 0.7) in the same GKD step, against the dense float64 reference."""
    b = {"name": "b", "server": server_b.url, "gkd_logits_topk": 5, "temperature": B_TEMPERATURE,
         "teacher_server": {"max_retries": 0, "verify_tokenizer": False}}
    teachers = json.dumps([{"name": "a", "model": setup["teacher"]}, b])
    result = run(setup, tmp_path / "out", layout, teachers=teachers, temperature=RUN_TEMPERATURE)
    step, examples = result["steps"][0], result["examples"]
    assert_routed_and_mixed(setup, examples)
    reference = gkd_reference(setup["student"], {"a": {"dir": setup["teacher"], "temperature": RUN_TEMPERATURE,
                                                       "topk": None},
                                                 "b": {"dir": setup["teacher_b"], "temperature": B_TEMPERATURE,
                                                       "topk": 5}},
                              setup["routes"], examples, beta=0.5)
    assert step["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    for name in ("a", "b"):
        assert step[f"divergence/{name}"] == pytest.approx(reference["divergence"][name], rel=1e-5)
    assert_gradients_match(result, reference["grads"])


def test_cache_teacher_writes_each_teachers_rows_and_trains_as_live(setup, tmp_path):
    """`cache-teacher` with two teachers writes DIR/a and DIR/b, each holding only its rows;
    a run from those caches takes the step the live teachers take at the same K."""
    from datasets import load_from_disk

    out = tmp_path / "cache"
    teachers = teachers_field(setup, b={"temperature": B_TEMPERATURE})
    argv = ["--out", str(out), *overrides(setup, tmp_path / "unused", teacher_model="null", teachers=teachers,
                                          gkd_logits_topk=8)]
    assert run_distributed(cache_on_rank, 1, argv, timeout=300) == [0]
    for name in ("a", "b"):
        rows = load_from_disk(str(out / name / "train"))["row"]
        assert rows == [row for row, routed in enumerate(setup["routes"]) if routed == name]
    cached = json.dumps([{"name": "a", "cache": str(out / "a")},
                         {"name": "b", "cache": str(out / "b"), "temperature": B_TEMPERATURE}])
    from_cache = run(setup, tmp_path / "cached", "tp1", teachers=cached, gkd_logits_topk=5)
    live = run(setup, tmp_path / "live", "tp1", teachers=teachers, gkd_logits_topk=5)
    assert from_cache["steps"][0]["loss"] == pytest.approx(live["steps"][0]["loss"], rel=1e-5)
    assert_same_update(from_cache, live, 1e-5)


def test_offload_loads_only_the_teachers_a_batch_needs(setup, tmp_path):
    """offload_teacher_model with two teachers: a step whose rows all go to a (no routing
    column, default_teacher a) loads a once and never b; both leave the device afterwards;
    the loss is the one without offload."""
    fields = {**SGD, "teacher_model": "null", "teachers": teachers_field(setup), "teacher_column": "domain",
              "default_teacher": "a", "training.micro_batch_size": 4}
    offloaded = run_distributed(offload_counts_on_rank, 1,
                                overrides(setup, tmp_path / "off", **fields, offload_teacher_model="true"),
                                timeout=300)[0]
    assert offloaded["teachers"]["a"]["loads"] == 1 and offloaded["teachers"]["b"]["loads"] == 0
    assert all(entry["resident"] == 0 for entry in offloaded["teachers"].values())
    plain = run_distributed(offload_counts_on_rank, 1, overrides(setup, tmp_path / "on", **fields), timeout=300)[0]
    assert offloaded["loss"] == plain["loss"] and plain["teachers"] == {}


def test_evaluation_routes_val_rows_and_reports_each_teacher(setup, tmp_path):
    """`Trainer.evaluate` on the val split (its own teacher column): per-teacher divergences
    and token counts that add up to the held-out ones."""
    argv = overrides(setup, tmp_path / "out", **{**SGD, "teacher_model": "null", "teachers": teachers_field(setup),
                                                 "training.eval_iters": 2})
    (metrics,) = run_distributed(evaluate_on_rank, 1, argv, timeout=300)
    assert metrics["tokens/a"] > 0 and metrics["tokens/b"] > 0
    assert_per_teacher_sums(metrics, "divergence")


def test_resume_with_teachers_and_refusal_when_a_teachers_weights_change(setup, tmp_path):
    """A run with `teachers` resumes; a teacher directory whose weights changed since is refused."""
    teacher_b = tmp_path / "teacher_b"
    shutil.copytree(setup["teacher_b"], teacher_b)
    teachers = json.dumps([{"name": "a", "model": setup["teacher"]}, {"name": "b", "model": str(teacher_b)}])
    argv = overrides(setup, tmp_path / "out", **{**SGD, "teacher_model": "null", "teachers": teachers,
                                                 "training.micro_batch_size": 4})
    assert run_distributed(train_and_save_on_rank, 1, argv, 1, timeout=300) == [1]
    assert run_distributed(train_and_save_on_rank, 1, argv, 1, timeout=300) == [2]
    other = make_hf_model("qwen2", tmp_path / "other_b", seed=13)  # teacher b's shape, other weights
    shutil.copy(other / "model.safetensors", teacher_b / "model.safetensors")
    (message,) = run_distributed(start_error_on_rank, 1, argv, timeout=300)
    assert "resuming from" in message and "teachers:" in message and "other contents" in message, message
