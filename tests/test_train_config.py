"""The training config: YAML + key=value overrides, every bad value named with its field."""

from __future__ import annotations

import pytest

from megatron_opd.config import ConfigError
from megatron_opd.config.job import JobConfig, apply_overrides, load_job_config

MINIMAL = "model: /models/student\nteacher_model: /models/teacher\ndata:\n  dataset: [train.jsonl]\n"


@pytest.fixture
def yaml_file(tmp_path):
    def write(text: str = MINIMAL):
        path = tmp_path / "run.yaml"
        path.write_text(text)
        return path
    return write


def test_defaults_follow_ms_swift(yaml_file):
    config = load_job_config(yaml_file(), world_size=1)
    assert isinstance(config, JobConfig)
    assert (config.beta, config.lmbda, config.sft_alpha, config.temperature) == (0.5, 0.5, 0.0, 0.9)
    assert (config.max_completion_length, config.gkd_logits_topk, config.seq_kd) == (512, None, False)
    assert config.teacher_model == "/models/teacher" and config.data.dataset == ["train.jsonl"]


def test_overrides_are_typed_by_yaml(yaml_file):
    config = load_job_config(yaml_file(), [
        "beta=0", "lmbda=1.0", "gkd_logits_topk=64", "teacher_model=/models/teacher",
        "parallel.tensor_model_parallel_size=2", "training.train_iters=7",
        "data.dataset=[a.jsonl, b.parquet]", "optimizer.lr=2e-5"], world_size=2)
    assert config.beta == 0.0 and isinstance(config.beta, float) and config.lmbda == 1.0
    assert config.gkd_logits_topk == 64 and config.teacher_model == "/models/teacher"
    assert config.parallel.tensor_model_parallel_size == 2 and config.training.train_iters == 7
    assert config.data.dataset == ["a.jsonl", "b.parquet"] and config.optimizer.lr == 2e-5


def test_override_creates_missing_sections():
    raw = apply_overrides({}, ["training.micro_batch_size=2", "model=x"])
    assert raw == {"training": {"micro_batch_size": 2}, "model": "x"}


@pytest.mark.parametrize("override,message", [
    ("beta=1.5", "beta=1.5 is invalid: in [0, 1]"),
    ("lmbda=-0.1", "lmbda=-0.1 is invalid: in [0, 1]"),
    ("temperature=0", "temperature=0.0 is invalid: a number > 0"),
    ("gkd_logits_topk=0", "gkd_logits_topk=0 is invalid"),
    ("sft_alpha=-1", "sft_alpha=-1.0 is invalid"),
    ("max_completion_length=0", "max_completion_length=0 is invalid"),
    ("beta=high", "beta='high' is invalid: a number"),
    ("algorithm=ppo", "algorithm='ppo' is invalid: one of ['gkd', 'opd_rl', 'sft']"),
    ("teacher=other", "teacher='other' is invalid"),
    ("reward_funcs=[m:f]", "reward_funcs=['m:f'] is invalid: empty unless algorithm: opd_rl"),
    ("opsd_clip=1.0", "opsd_clip=1.0 is invalid: null unless teacher: self"),
    ("optimizer.lr=0", "optimizer.lr=0.0 is invalid"),
    ("optimizer.min_lr=1", "optimizer.min_lr=1.0 is invalid"),
    ("training.global_batch_size=7", "training.global_batch_size=7 is invalid: a multiple of "
                                     "training.micro_batch_size=2"),
    ("training.precision=fp8", "training.precision='fp8' is invalid"),
    ("parallel.tensor_model_parallel_size=0", "parallel.tensor_model_parallel_size=0 is invalid"),
    ("trainig.train_iters=3", "unknown key(s) trainig"),
    ("training.iters=3", "unknown key(s) training.iters"),
    (("teacher_model=null", "teacher_model_server=http://localhost:8000"), "gkd_logits_topk=None is invalid: an integer >= 1 when "
                                                   "teacher_model_server is set"),
    ("beta", "write key=value"),
    ("optimizer={optimizer: sgd, use_distributed_optimizer: true}",
     "optimizer.use_distributed_optimizer=True is invalid: false with "
                                "optimizer.optimizer='sgd'"),
])
def test_bad_values_name_the_field(yaml_file, override, message):
    with pytest.raises(ConfigError) as raised:
        extra = list(override) if isinstance(override, tuple) else [override]
        load_job_config(yaml_file(), ["training.micro_batch_size=2", *extra], world_size=1)
    assert message in str(raised.value)


@pytest.mark.parametrize("overrides,message", [
    (["num_generations=1"], "num_generations=1 is invalid: an integer >= 2"),
    (["num_generations=3"], "training.global_batch_size=8 is invalid: a multiple of num_generations=3"),
    (["epsilon=0"], "epsilon=0.0 is invalid: a number > 0"),
    (["epsilon_high=-1"], "epsilon_high=-1.0 is invalid"),
    (["seq_kd=true"], "seq_kd=True is invalid: false with algorithm: opd_rl"),
    (["teacher_model=null"], "reward_funcs=[] is invalid: at least one module:function when algorithm: opd_rl "
                             "has no teacher"),
    (["num_iterations=2", "training.train_iters=5"], "training.train_iters=5 is invalid: a multiple of "
                                                     "num_iterations=2"),
    (["num_iterations=2", "training.save_interval=3"], "training.save_interval=3 is invalid"),
    (["training.eval_interval=5"], "training.eval_interval=5 is invalid: 0 with algorithm: opd_rl"),
    (["teacher=self", "teacher_model=null", "offload_teacher_model=true"],
     "offload_teacher_model=True is invalid: false unless teacher_model is set"),
    (["teacher=self", "teacher_model=null", "teacher_model_server=http://h:1", "gkd_logits_topk=4"],
     "teacher_model_server='http://h:1' is invalid: null with teacher: self"),
])
def test_bad_opd_rl_and_opsd_settings_name_the_field(yaml_file, overrides, message):
    base = ["algorithm=opd_rl", "teacher_model=t", "num_generations=4", "training.global_batch_size=8",
            "training.train_iters=4", "training.eval_interval=0"]
    with pytest.raises(ConfigError) as raised:
        load_job_config(yaml_file(), base + overrides, world_size=1)
    assert message in str(raised.value)


def test_opd_rl_defaults_follow_trl():
    config = load_job_config(None, ["model=m", "data.dataset=[d]", "algorithm=opd_rl", "teacher_model=t",
                                      "training.global_batch_size=16"])
    assert (config.num_generations, config.num_iterations, config.epsilon, config.epsilon_high,
            config.teacher_kl_coef, config.reward_funcs, config.teacher) == (8, 1, 0.2, None, 1.0, [], "model")


@pytest.mark.parametrize("overrides,message", [
    (["teacher_model_server=localhost:8000"], "teacher_model_server='localhost:8000' is invalid: an http(s) URL"),
    (["teacher_model_server=http://h:1", "gkd_logits_topk=null"], "gkd_logits_topk=None is invalid: an integer >= 1 "
                                                                  "when teacher_model_server is set"),
    (["teacher_model_server=http://h:1", "offload_teacher_model=true"], "offload_teacher_model=True is invalid"),
    (["teacher_model_server=http://h:1", "algorithm=opd_rl", "num_generations=2", "training.eval_interval=0"],
     "temperature=0.9 is invalid: 1.0 with algorithm: opd_rl and teacher_model_server"),
    (["teacher_cache=/c", "teacher_model=t"], "teacher_model='t' is invalid: null when teacher_cache is set"),
    (["teacher_cache=/c", "lmbda=0.5"], "lmbda=0.5 is invalid: 0 with teacher_cache"),
    (["teacher_cache=/c", "seq_kd=true"], "lmbda=0.0 is invalid: 0 with teacher_cache and seq_kd false"),
    (["teacher_cache=/c", "gkd_logits_topk=null"], "gkd_logits_topk=None is invalid: an integer >= 1 when "
                                                   "teacher_cache is set"),
    (["teacher_cache=/c", "algorithm=sft"], "teacher_cache='/c' is invalid: null with algorithm: sft"),
    (["teacher_server.timeout_s=0"], "teacher_server.timeout_s=0.0 is invalid: a number > 0"),
    (["teacher_server.max_concurrency=0"], "teacher_server.max_concurrency=0 is invalid"),
    (["teacher_server.nope=1"], "teacher_server.nope"),
])
def test_bad_server_and_cache_settings_name_the_field(overrides, message):
    base = ["model=m", "data.dataset=[d]", "teacher_model=null", "teacher_cache=/c", "gkd_logits_topk=4", "lmbda=0"]
    with pytest.raises(ConfigError) as raised:
        load_job_config(None, base + overrides)
    assert message in str(raised.value)


def test_server_and_cache_settings_load():
    base = ["model=m", "data.dataset=[d]", "gkd_logits_topk=4", "lmbda=0"]
    server = load_job_config(None, base + ["teacher_model_server=http://127.0.0.1:8000/v1",
                                             "teacher_server.max_retries=0"])
    assert server.teacher_server.max_retries == 0 and server.teacher_server.verify_tokenizer
    assert load_job_config(None, base + ["teacher_cache=/c"]).teacher_cache == "/c"


def test_server_and_local_teacher_exclude_each_other(yaml_file):
    with pytest.raises(ConfigError, match="teacher_model='t' is invalid: null when teacher_model_server"):
        load_job_config(yaml_file(), ["teacher_model=t", "teacher_model_server=http://h:1",
                                        "gkd_logits_topk=8"], world_size=1)


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.tensor_model_parallel_size=2"], "a divisor of the world size 3"),
    (4, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"], None),
    (4, ["training.global_batch_size=6", "training.micro_batch_size=2"],
     "a multiple of micro_batch_size * data-parallel size = 8"),
])
def test_layout_checked_against_world_size(yaml_file, world, overrides, message):
    if message is None:
        assert load_job_config(yaml_file(), overrides, world_size=world).check_world(world) == 1
        return
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        load_job_config(yaml_file(), overrides, world_size=world)


def test_missing_required_and_bad_files(yaml_file, tmp_path):
    with pytest.raises(ConfigError, match="missing required key model"):
        load_job_config(yaml_file("data:\n  dataset: [a.jsonl]\n"), world_size=1)
    with pytest.raises(ConfigError, match="missing required key data.dataset"):
        load_job_config(yaml_file("model: m\ndata: {}\n"), world_size=1)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(yaml_file("model: [unclosed\n"), world_size=1)
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_job_config(yaml_file("- a\n- b\n"), world_size=1)
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_job_config(tmp_path / "nope.yaml")


def test_exponent_without_dot_is_a_float(yaml_file):
    """PyYAML alone reads `2e-5` as a string; Megatron users write learning rates that way."""
    config = load_job_config(yaml_file(MINIMAL + "optimizer:\n  lr: 2e-5\n  min_lr: 1E-6\n"), world_size=1)
    assert config.optimizer.lr == 2e-5 and config.optimizer.min_lr == 1e-6


def test_shipped_recipes_load():
    from pathlib import Path

    recipes = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert {recipe.stem.split("_")[0] for recipe in recipes} >= {"gkd", "opd", "opsd", "quickstart"}
    for recipe in recipes:
        config = load_job_config(recipe)
        parallel = config.parallel
        config.check_world(parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size)
