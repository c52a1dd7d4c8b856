"""`streamed_hf_logits` (what `convert verify` compares against): HF's own forward with one
block's weights loaded at a time gives the logits of the model loaded whole."""

from __future__ import annotations

import pytest
import torch

from megatron_opd.checkpoint.hf_streamed import streamed_hf_logits
from tests.hf_models import hf_logits, make_hf_model


@pytest.mark.parametrize("family, fields", [
    ("llama2", {}), ("qwen2", {"tie_word_embeddings": True}), ("qwen3", {}),
], ids=["llama2", "qwen2_tied", "qwen3"])
def test_streamed_forward_equals_the_whole_model(tmp_path, family, fields):
    directory = make_hf_model(family, tmp_path / family, seed=3, **fields)
    token_ids = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    logits, peak_params = streamed_hf_logits(directory, token_ids)
    torch.testing.assert_close(logits, hf_logits(directory, token_ids), rtol=0, atol=0)
    # At most one block at a time: the largest of embedding, layer, LM head; never the model.
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(directory)
    blocks = [whole.model.embed_tokens, *whole.model.layers, whole.lm_head]
    assert peak_params == max(sum(p.numel() for p in block.parameters()) for block in blocks)
    assert peak_params < sum(p.numel() for p in whole.parameters()) / 2


def test_a_tensor_of_another_shape_is_named(tmp_path):
    import json

    directory = make_hf_model("llama2", tmp_path / "model", seed=3)
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] *= 2
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.gate_proj.weight has shape .* expects"):
        streamed_hf_logits(directory, torch.zeros(1, 4, dtype=torch.long))
