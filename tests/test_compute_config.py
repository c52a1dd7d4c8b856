"""The `compute` section: layer spec and activation recomputation, set from YAML.

Recomputation must change memory, never results: a GKD step with full (uniform, block)
or selective recomputation gives the gradient of one without it. Counting each layer's
forward calls shows the recomputation really runs (a layer recomputed in the backward
runs twice per microbatch), so the equality cannot pass because the knob was ignored.
"""

from __future__ import annotations

import pytest

from megatron_opd.config import ConfigError
from megatron_opd.config.compute import ComputeConfig
from megatron_opd.config.job import load_job_config
from megatron_opd.testing import run_distributed
from tests.gkd_setup import make_gkd_setup, overrides
from tests.helpers.trainer_runs import SGD, assert_same_update


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return make_gkd_setup(tmp_path_factory.mktemp("compute"))


def _step_counting_forwards(argv: list[str]) -> dict:
    from megatron_opd.config.job import load_job_config
    from megatron_opd.models import gather_full_tensors
    from megatron_opd.models.tp_layout import unwrap
    from megatron_opd.trainer.trainer import Trainer

    trainer = Trainer(load_job_config(None, argv))
    calls = {"layer": 0, "core_attention": 0, "teacher_layer": 0}

    def counter(key):
        def hook(module, inputs, output):
            calls[key] += 1
        return hook

    student, teacher = unwrap(trainer.model), unwrap(trainer.teacher.model)
    for layer in student.decoder.layers:
        layer.register_forward_hook(counter("layer"))
        layer.self_attention.core_attention.register_forward_hook(counter("core_attention"))
    for layer in teacher.decoder.layers:
        layer.register_forward_hook(counter("teacher_layer"))
    initial = {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)}
    steps = [trainer.train_step()]
    return {"steps": steps, "calls": calls, "initial": initial, "num_layers": len(student.decoder.layers),
            "weights": {name: tensor.clone() for name, tensor in gather_full_tensors(trainer.model)},
            "grads": {name: tensor.clone()
                      for name, tensor in gather_full_tensors(trainer.model, lambda param: param.main_grad)}}


RECOMPUTE = {
    "none": {},
    "full_uniform": {"compute.recompute_granularity": "full", "compute.recompute_method": "uniform",
                     "compute.recompute_num_layers": 1},
    "full_block": {"compute.recompute_granularity": "full", "compute.recompute_method": "block",
                   "compute.recompute_num_layers": 1},
    "selective": {"compute.recompute_granularity": "selective", "compute.recompute_modules": "[core_attn]"},
}


@pytest.mark.slow  # ~40 s: four trainer runs; the config checks below are the fast part
def test_recomputation_changes_nothing_but_runs(setup, tmp_path):
    """One step (4 microbatches) per setting at TP=1: the same loss and update as without
    recomputation (fp32, 1e-6 relative: the backward replays the same forward), and the
    recomputed modules run twice per microbatch: every layer (uniform), the first layer
    only (block, 1 layer), core attention only (selective). The teacher never recomputes."""
    results = {}
    for name, fields in RECOMPUTE.items():
        argv = overrides(setup, tmp_path / name, **{**SGD, "training.micro_batch_size": 2, **fields})
        (results[name],) = run_distributed(_step_counting_forwards, 1, argv, timeout=300)
    baseline = results["none"]
    layers, microbatches = baseline["num_layers"], 4
    assert baseline["calls"] == {"layer": layers * microbatches, "core_attention": layers * microbatches,
                                 "teacher_layer": baseline["calls"]["teacher_layer"]}
    expected_extra = {"full_uniform": {"layer": layers, "core_attention": layers},
                      "full_block": {"layer": 1, "core_attention": 1},
                      "selective": {"layer": 0, "core_attention": layers}}
    for name, extra in expected_extra.items():
        result = results[name]
        assert abs(result["steps"][0]["loss"] - baseline["steps"][0]["loss"]) < 1e-6, name
        assert_same_update(result, baseline, 1e-6)
        for key, per_microbatch in extra.items():
            assert result["calls"][key] == baseline["calls"][key] + per_microbatch * microbatches, (name, result["calls"])
        assert result["calls"]["teacher_layer"] == baseline["calls"]["teacher_layer"], name


@pytest.mark.parametrize("fields, message", [
    ({"recompute_granularity": "full"}, "compute.recompute_method=None is invalid: 'uniform' or 'block'"),
    ({"recompute_granularity": "full", "recompute_method": "uniform"},
     "compute.recompute_num_layers=None is invalid: an integer >= 1"),
    ({"recompute_granularity": "selective", "recompute_num_layers": 2},
     "compute.recompute_num_layers=2 is invalid: null unless compute.recompute_granularity: full"),
    ({"recompute_method": "block"}, "compute.recompute_method='block' is invalid"),
    ({"recompute_modules": ["core_attn"]}, "compute.recompute_modules=.* is invalid: null unless"),
    ({"recompute_granularity": "selective", "recompute_modules": ["moe"]},
     r"compute.recompute_modules=\['moe'\] is invalid: a non-empty list of \['core_attn', 'layernorm', 'mlp'\]"),
    ({"transformer_impl": "local", "attention_backend": "flash"},
     "compute.attention_backend='flash' is invalid: 'auto' with compute.transformer_impl: local"),
])
def test_bad_compute_settings_name_the_field(fields, message):
    with pytest.raises(ConfigError, match=message):
        ComputeConfig(**fields)


def test_compute_is_read_from_yaml_and_checked_against_the_layers(setup, tmp_path):
    config = load_job_config(None, overrides(setup, tmp_path, **{"compute.transformer_impl": "local",
                                                                 "compute.recompute_granularity": "selective"}))
    assert config.compute == ComputeConfig(transformer_impl="local", recompute_granularity="selective")
    with pytest.raises(ConfigError, match="compute.transformer_impl='te' is invalid: one of"):
        load_job_config(None, overrides(setup, tmp_path, **{"compute.transformer_impl": "te"}))
    full = ComputeConfig(recompute_granularity="full", recompute_method="block", recompute_num_layers=3)
    full.check_layers(num_layers=6, pipeline_model_parallel_size=2)
    with pytest.raises(ConfigError, match=r"compute.recompute_num_layers=3 is invalid: at most the layers per "
                                          r"pipeline stage \(4 / 2 = 2\)"):
        full.check_layers(num_layers=4, pipeline_model_parallel_size=2)
