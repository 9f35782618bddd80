"""The loader names the problem: missing, unexpected or mis-shaped tensors, bad configs, bad files."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from resilient_moe.model.config import ModelConfig
from resilient_moe.errors import CheckpointError, ConfigError
from resilient_moe.model.weights import Checkpoint


@pytest.fixture
def model_copy(tmp_path, tiny_model):
    target = tmp_path / "model"
    shutil.copytree(tiny_model, target)
    return target


def _rewrite(model_dir, change):
    tensors = load_file(str(model_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def test_missing_tensor_is_named(model_copy):
    _rewrite(model_copy, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.5.w3.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.2.block_sparse_moe.experts.5.w3.weight'"):
        Checkpoint(model_copy)


def test_unexpected_tensor_is_named(model_copy):
    _rewrite(model_copy, lambda t: t.__setitem__("model.layers.0.mlp.surprise.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.0.mlp.surprise.weight'"):
        Checkpoint(model_copy)


def test_misshaped_tensor_is_named(model_copy):
    _rewrite(model_copy, lambda t: t.__setitem__("model.layers.1.self_attn.k_proj.weight", torch.zeros(16, 64)))
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.k_proj.weight' has shape \[16, 64\], expected \[32, 64\]"):
        Checkpoint(model_copy)


def test_unsupported_family_lists_supported(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"unsupported model family 'llama' \(supported: mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss\)"):
        Checkpoint(model_copy)


def test_broken_config_json(model_copy):
    (model_copy / "config.json").write_text('{"model_type": "mixtral", ')
    with pytest.raises(ConfigError, match=r"config.json: not valid JSON"):
        Checkpoint(model_copy)
    config = {"model_type": "mixtral", "hidden_size": 64}
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"required field 'num_hidden_layers' is missing"):
        Checkpoint(model_copy)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("num_attention_heads", 3, r"num_attention_heads \(3\) must be a multiple of num_key_value_heads \(2\)"),
        ("num_experts_per_tok", 99, r"num_experts_per_tok \(99\) exceeds the number of experts"),
        ("hidden_act", "gelu", r"hidden_act 'gelu' is not supported"),
        ("rms_norm_eps", "tiny", r"rms_norm_eps must be a number, got 'tiny'"),
        ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}, r"rope type 'longrope' is not supported"),
    ],
)
def test_invalid_config_fields(model_copy, field, value, message):
    config = json.loads((model_copy / "config.json").read_text())
    config[field] = value
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_pretrained(model_copy)


def test_corrupt_safetensors_file(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        Checkpoint(model_copy)


def test_no_weights_at_all(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files found"):
        Checkpoint(model_copy)


def test_sharded_checkpoint_loads_and_missing_shard_is_named(model_copy):
    tensors = load_file(str(model_copy / "model.safetensors"))
    (model_copy / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map = {}
    for file, file_names in shards.items():
        save_file({n: tensors[n] for n in file_names}, str(model_copy / file))
        weight_map.update({n: file for n in file_names})
    (model_copy / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    checkpoint = Checkpoint(model_copy)
    loaded = checkpoint.load(names, torch.float32)
    assert all(torch.equal(loaded[n], tensors[n]) for n in names)
    (model_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors is listed but missing"):
        Checkpoint(model_copy)


def test_expert_side_loads_only_its_experts(tiny_model):
    from resilient_moe.model.expert_side import ExpertSide

    side = ExpertSide(Checkpoint(tiny_model), experts=[(0, 1), (3, 7)])
    assert side.held == [(0, 1), (3, 7)]
    assert side.holds(3, 7) and not side.holds(0, 2)
