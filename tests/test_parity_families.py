"""DeepSeek-V3 and GPT-OSS: parity with transformers (float32, eager attention) on checkpoints it saved
itself, MXFP4 experts, the latent KV cache, routers, batch invariance, loader errors, tiny checkpoints."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import test_batch_invariance as invariance
import test_parity_hf as parity
from test_cli import cli
from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.model.config import ModelConfig
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.engine.kv_cache import LatentKVCache, cache_blocks, new_kv_cache
from resilient_moe.errors import CheckpointError, ConfigError
from resilient_moe.model import mxfp4, ops, routing
from resilient_moe.model.weights import Checkpoint

NEW_FAMILIES = ("deepseek_v3", "gpt_oss")
DEEPSEEK_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}
GPT_OSS_YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "original_max_position_embeddings": 16,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}
MXFP4_CONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": [
    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}


def family_config(family: str, **overrides):
    """A transformers config of `family` with tiny dimensions (and wide weights, so greedy picks are far from ties)."""
    from transformers import DeepseekV3Config, GptOssConfig

    common = dict(vocab_size=320, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=512, initializer_range=0.1)
    if family == "deepseek_v3":
        kwargs = dict(common, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                      first_k_dense_replace=1, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                      qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, norm_topk_prob=True,
                      rope_parameters=DEEPSEEK_YARN, num_nextn_predict_layers=0)
        cls = DeepseekV3Config
    else:
        kwargs = dict(common, num_key_value_heads=2, head_dim=16, intermediate_size=32, num_local_experts=6,
                      num_experts_per_tok=2, sliding_window=6, swiglu_limit=0.5, rope_parameters=GPT_OSS_YARN)
        cls = GptOssConfig
    kwargs.update(overrides)
    return cls(**kwargs)


def save_family_model(path, family: str, seed: int = 0, **overrides):
    """Build a random model with transformers and save_pretrained it (the real on-disk names and layouts)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(family_config(family, **overrides), attn_implementation="eager")
    with torch.no_grad():
        # transformers starts these at zero; random values make them count in the comparison.
        for name, tensor in model.named_parameters(remove_duplicate=False):
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                tensor.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.3)  # large enough to change which experts win
    model.save_pretrained(path)
    return path


def quantize_experts_to_mxfp4(model_dir) -> None:
    """Rewrite a GPT-OSS checkpoint's experts as MXFP4 blocks and scales, as the released checkpoints store them."""
    tensors = load_file(str(model_dir / "model.safetensors"))
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        stored = tensors.pop(name).transpose(1, 2)  # [E, in, out] -> [E, out, in]
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = mxfp4.quantize(stored)
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = MXFP4_CONFIG
    (model_dir / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: save_family_model(root / family, family, seed=11 + i) for i, family in enumerate(NEW_FAMILIES)}


@pytest.fixture(scope="module")
def tiny_family_models(tmp_path_factory):
    from resilient_moe.model.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("tiny-families")
    return {family: make_tiny_model(root / family, family, seed=5) for family in NEW_FAMILIES}


def _assert_matches(reference, tokens, logits):
    for i, (ref_tokens, ref_logits) in enumerate(reference):
        assert tokens[i] == ref_tokens, f"prompt {i}: greedy tokens differ from transformers"
        diff = (logits[i] - ref_logits).abs().max().item()
        assert diff < parity.TOLERANCE, f"prompt {i}: max |logit diff| {diff:.2e}"


# ---- parity with transformers -----------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_continuous_batching_matches_transformers(family_checkpoints, family):
    prompts = parity.ragged_prompts(9, 320, seed=21)
    join_at = [0, 0, 0, 0, 3, 3, 7, 12, 20]  # requests join while others are mid-decode
    new_tokens = parity.DECODE_STEPS + 1  # the prefill's token, then 32 decode steps
    reference = parity.hf_reference(family_checkpoints[family], prompts, new_tokens)
    tokens, logits = parity.run_continuous(family_checkpoints[family], prompts, new_tokens, join_at, micro_batches=2)
    _assert_matches(reference, tokens, logits)
    # All at once through generate(): one continuous batch of every prompt.
    engine = LLMEngine(family_checkpoints[family], EngineConfig(micro_batches=3))
    results = engine.generate(prompts, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
    assert [r.token_ids for r in results] == [ref_tokens for ref_tokens, _ in reference]


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_bfloat16_runs_close_to_float32(family_checkpoints, family):
    prompts = parity.ragged_prompts(4, 320, seed=9)
    _, f32 = parity.run_continuous(family_checkpoints[family], prompts, 4, [0, 0, 0, 0])
    _, bf16 = parity.run_continuous(family_checkpoints[family], prompts, 4, [0, 0, 0, 0], dtype="bfloat16")
    # bfloat16 keeps ~3 significant digits; the first token's logits (magnitude ~2) must agree to that precision.
    for a, b in zip(f32, bf16):
        assert (a[0] - b[0]).abs().max().item() < 0.1


VARIANTS = [
    ("deepseek_v3", {"q_lora_rank": None, "attention_bias": True, "rope_interleave": False}),
    ("deepseek_v3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "n_group": 1,
                     "topk_group": 1, "norm_topk_prob": False, "first_k_dense_replace": 0}),
    ("gpt_oss", {"sliding_window": 3, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"]}),
    ("gpt_oss", {"attention_bias": False, "layer_types": ["full_attention"] * 3,
                 "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}),
]


@pytest.mark.parametrize("family,overrides", VARIANTS,
                         ids=["q-lora-null-bias-no-interleave", "yarn-off-one-group", "window-3", "full-no-bias"])
def test_config_variants_match_transformers(tmp_path, family, overrides):
    model_dir = save_family_model(tmp_path / "m", family, seed=3, **overrides)
    prompts = parity.ragged_prompts(8, 320, seed=8)
    new_tokens = parity.DECODE_STEPS + 1
    reference = parity.hf_reference(model_dir, prompts, new_tokens)
    tokens, logits = parity.run_continuous(model_dir, prompts, new_tokens, [0, 0, 0, 2, 2, 5, 9, 9])
    _assert_matches(reference, tokens, logits)


def test_mxfp4_experts_match_transformers(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model_dir = save_family_model(tmp_path / "m", "gpt_oss", seed=4)
    quantize_experts_to_mxfp4(model_dir)
    cfg = ModelConfig.from_pretrained(model_dir)
    assert cfg.experts.layout == "mxfp4"
    # transformers dequantizes the same blocks and scales with its own code (exact in float32).
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", functools.partial(
        AutoModelForCausalLM.from_pretrained, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32))
    prompts = parity.ragged_prompts(8, 320, seed=12)
    new_tokens = parity.DECODE_STEPS + 1
    reference = parity.hf_reference(model_dir, prompts, new_tokens)
    tokens, logits = parity.run_continuous(model_dir, prompts, new_tokens, [0, 0, 0, 1, 1, 4, 4, 10], micro_batches=2)
    _assert_matches(reference, tokens, logits)


def test_mxfp4_dequantize_matches_transformers_and_rounds_to_nearest_even():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)  # every code appears
    scales = torch.randint(110, 140, (3, 5, 4), generator=g, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).transpose(1, 2)  # [3, 5, 128]
    assert torch.equal(mxfp4.dequantize(blocks, scales), theirs)
    # Values already on the grid survive a round trip; midpoints go to the even code; beyond 6 saturates.
    values = mxfp4.dequantize(blocks, scales)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(values)), values)
    row = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -5.0, -0.25] + [0.0] * 22)
    expected = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, -4.0, 0.0] + [0.0] * 22)
    assert torch.equal(mxfp4.dequantize(*mxfp4.quantize(row.unsqueeze(0)))[0], expected)
    # A block's largest element sets its scale, 2**(floor(log2(0.3)) - 2) = 2**-4; 0.3 / 2**-4 = 4.8 rounds to 4.
    blocks_out, scales_out = mxfp4.quantize(torch.full((1, 32), 0.3))
    assert int(scales_out[0, 0]) - 127 == -4
    assert torch.equal(mxfp4.dequantize(blocks_out, scales_out), torch.full((1, 32), 4 * 2.0**-4))


# ---- routers, against transformers' own modules ---------------------------------------------------


def test_routers_match_transformers_modules():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

    torch.manual_seed(0)
    x = torch.randn(64, 64)
    ds = DeepseekV3TopkRouter(family_config("deepseek_v3"))
    with torch.no_grad():
        ds.weight.normal_(0, 0.3)
        ds.e_score_correction_bias.normal_(0, 0.3)
        _, ref_weights, ref_ids = ds(x)
    ids, weights = routing.grouped_sigmoid_topk(x @ ds.weight.T, ds.e_score_correction_bias, 2, 4, 2, True, 2.5)
    order, ref_order = ids.sort(dim=-1), ref_ids.sort(dim=-1)  # transformers leaves its picks unsorted
    assert torch.equal(order.values, ref_order.values)
    assert torch.allclose(weights.gather(1, order.indices), ref_weights.gather(1, ref_order.indices), atol=1e-6)

    oss = GptOssTopKRouter(family_config("gpt_oss"))
    with torch.no_grad():
        oss.weight.normal_(0, 0.3)
        oss.bias.normal_(0, 0.3)
        _, ref_weights, ref_ids = oss(x)
    ids, weights = routing.topk_then_softmax(x @ oss.weight.T + oss.bias, 2)
    assert torch.equal(ids, ref_ids) and torch.allclose(weights, ref_weights, atol=1e-6)


def test_grouped_routing_bias_steers_choice_but_not_weights():
    logits = torch.tensor([[3.0, 2.9, -2.0, -2.0]])
    bias = torch.tensor([0.0, 0.5, 0.0, 0.0])
    ids, weights = routing.grouped_sigmoid_topk(logits, bias, 1, 1, 1, False, 2.0)
    assert ids.tolist() == [[1]], "the correction bias should pick expert 1"
    assert torch.allclose(weights, torch.sigmoid(torch.tensor([[2.9]])) * 2.0), "weights use the unbiased score"
    # Group 0 holds the single best expert, group 1 the best pair: with one group kept, both picks come from 1.
    logits = torch.tensor([[4.0, -4.0, 2.0, 2.0]])
    ids, weights = routing.grouped_sigmoid_topk(logits, torch.zeros(4), 2, 2, 1, True, 2.5)
    assert sorted(ids[0].tolist()) == [2, 3] and torch.allclose(weights.sum(), torch.tensor(2.5))


# ---- the latent KV cache -------------------------------------------------------------------------


def test_latent_cache_holds_latent_and_rope_key_per_token(family_checkpoints):
    from transformers import AutoModelForCausalLM

    model_dir = family_checkpoints["deepseek_v3"]
    cfg = ModelConfig.from_pretrained(model_dir)
    assert cfg.kv_row_width == 32 + 8 and cfg.kv_bytes_per_token == 3 * 40 * 4
    prompt = parity.ragged_prompts(1, 320, seed=4)[0]
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        hf_cache = hf(torch.tensor([prompt]), use_cache=True).cache
    engine = LLMEngine(model_dir, EngineConfig(block_size=4))
    assert isinstance(engine.cache, LatentKVCache) and engine.cache.row_width == 40
    seq = engine.add_request("r", prompt, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.step()  # the prefill writes every prompt position
    positions = torch.arange(len(prompt))
    slots = torch.tensor(seq.block_table)[positions // 4] * 4 + positions % 4
    rows = engine.cache.gather(slots)  # [L, n, C + r]
    for layer, hf_layer in enumerate(hf_cache.layers):
        # transformers' cache: the normed latent as keys, the rotated shared rope key as values
        expected = torch.cat([hf_layer.keys[0, 0], hf_layer.values[0, 0]], dim=-1)
        assert (rows[layer] - expected).abs().max().item() < 1e-5


def test_latent_cache_gather_scatter_round_trip_and_capacity(family_checkpoints):
    cfg = ModelConfig.from_pretrained(family_checkpoints["deepseek_v3"])
    cache = new_kv_cache(cfg, num_blocks=6, block_size=4, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(cache, LatentKVCache)
    assert (cache.num_layers, cache.row_width, cache.dtype) == (3, 40, torch.float32)
    assert cache.nbytes == 3 * 6 * 4 * 40 * 4, "values are views into the latent rows, not a second copy"
    g = torch.Generator().manual_seed(0)
    slots = torch.tensor([3, 17, 0, 22, 9])
    data = torch.randn(3, 5, 40, generator=g)
    cache.scatter(slots, data)
    assert torch.equal(cache.gather(slots), data)
    assert torch.equal(cache.values[1][0, 17], data[1, 1, :32]), "values are the latent part of the row"
    other = new_kv_cache(cfg, 6, 4, torch.float32, torch.device("cpu"))
    other.scatter(slots, cache.gather(slots))
    assert torch.equal(other.gather(slots), data)
    # Capacity in bytes buys latent-sized tokens.
    per_token = cfg.num_layers * cfg.kv_row_width * 4
    assert cache_blocks(cfg, EngineConfig(kv_cache_bytes=per_token * 64, block_size=16), torch.float32) == 4


def test_kv_bytes_per_token_of_every_family(family_checkpoints, hf_checkpoints):
    deepseek = ModelConfig.from_pretrained(family_checkpoints["deepseek_v3"])
    assert deepseek.kv_row_width == deepseek.mla.kv_lora_rank + deepseek.mla.qk_rope_head_dim
    gpt_oss = ModelConfig.from_pretrained(family_checkpoints["gpt_oss"])
    assert gpt_oss.kv_row_width == 2 * 2 * 16
    for model in [deepseek, gpt_oss] + [ModelConfig.from_pretrained(d) for d in hf_checkpoints.values()]:
        cache = new_kv_cache(model, 2, 16, torch.float32, torch.device("cpu"))
        assert cache.row_width == model.kv_row_width
        assert cache.nbytes == model.kv_bytes_per_token * 2 * 16


# ---- batch invariance ---------------------------------------------------------------------------


def test_sink_attention_row_independent_of_padding_and_batch():
    g = torch.Generator().manual_seed(3)
    G, R, d = 2, 3, 16
    keys = torch.randn(G, 1, 64, d, generator=g)
    values = torch.randn(G, 1, 64, 24, generator=g)
    q = torch.randn(G, 1, R, d, generator=g)
    sinks = torch.randn(G, 1, R, generator=g)

    def run(length, copies):
        masked = (torch.arange(length) >= 21).expand(copies, R, length)
        k = keys[:, :, :length].expand(-1, copies, -1, -1)
        v = values[:, :, :length].expand(-1, copies, -1, -1)
        return ops.attention(q.expand(-1, copies, -1, -1), k, v, masked, 0.25, sinks)[:, 0]

    reference = run(32, 1)
    assert reference.shape == (G, R, 24)
    for length in (48, 64):
        for copies in (1, 3, 8):
            assert torch.equal(run(length, copies), reference)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_engine_logits_identical_alone_and_in_batches(tiny_family_models, family):
    for micro_batches in (1, 3):
        ref, got = invariance._logits_alone_and_batched(tiny_family_models[family], micro_batches)
        assert len(ref) == len(got) == 6
        for a, b in zip(ref, got):
            assert torch.equal(a, b), f"logits changed with batch composition (micro_batches={micro_batches})"


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_recompute_after_preemption_gives_identical_tokens(tiny_family_models, family):
    invariance.test_recompute_after_preemption_gives_identical_tokens(tiny_family_models[family])


# ---- loading ------------------------------------------------------------------------------------


@pytest.fixture
def copies(tmp_path, family_checkpoints):
    def copy(family, mxfp4_experts=False):
        target = tmp_path / family
        shutil.copytree(family_checkpoints[family], target)
        if mxfp4_experts:
            quantize_experts_to_mxfp4(target)
        return target

    return copy


def _rewrite(model_dir, change):
    tensors = load_file(str(model_dir / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(model_dir / "model.safetensors"))


def _drop(name):
    return lambda tensors: tensors.pop(name)


def _replace(name, tensor):
    return lambda tensors: tensors.__setitem__(name, tensor)


EXPERTS = "model.layers.{}.mlp.experts"


@pytest.mark.parametrize(
    "family,mxfp4_experts,change,message",
    [
        ("deepseek_v3", False, _drop("model.layers.2.mlp.gate.e_score_correction_bias"),
         r"missing tensor 'model.layers.2.mlp.gate.e_score_correction_bias'"),
        ("deepseek_v3", False, _replace("model.layers.0.self_attn.kv_b_proj.weight", torch.zeros(96, 32)),
         r"'model.layers.0.self_attn.kv_b_proj.weight' has shape \[96, 32\], expected \[128, 32\]"),
        ("gpt_oss", False, _drop("model.layers.1.self_attn.sinks"), r"missing tensor 'model.layers.1.self_attn.sinks'"),
        ("gpt_oss", False, _replace(EXPERTS.format(0) + ".down_proj", torch.zeros(6, 64, 32)),
         r"'model.layers.0.mlp.experts.down_proj' has shape \[6, 64, 32\], expected \[6, 32, 64\]"),
        ("gpt_oss", True, _replace(EXPERTS.format(2) + ".gate_up_proj_scales", torch.zeros(6, 64, 1, dtype=torch.uint8)),
         r"'model.layers.2.mlp.experts.gate_up_proj_scales' has shape \[6, 64, 1\], expected \[6, 64, 2\]"),
        ("gpt_oss", True, _replace(EXPERTS.format(0) + ".down_proj_blocks", torch.zeros(6, 64, 1, 16)),
         r"'model.layers.0.mlp.experts.down_proj_blocks' has dtype F32, expected U8 \(MXFP4\)"),
        ("gpt_oss", True, _replace(EXPERTS.format(0) + ".gate_up_proj", torch.zeros(6, 64, 64)),
         r"unexpected tensor 'model.layers.0.mlp.experts.gate_up_proj'"),
    ],
    ids=["ds-missing", "ds-misshaped", "oss-missing-sinks", "oss-misshaped", "mxfp4-scales", "mxfp4-dtype",
         "mxfp4-float-too"],
)
def test_loader_names_the_bad_tensor(copies, family, mxfp4_experts, change, message):
    model_dir = copies(family, mxfp4_experts)
    _rewrite(model_dir, change)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(model_dir)


def test_multi_token_prediction_layers_are_skipped_only_when_declared(copies):
    model_dir = copies("deepseek_v3")
    _rewrite(model_dir, _replace("model.layers.3.eh_proj.weight", torch.zeros(64, 128)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.3.eh_proj.weight'"):
        Checkpoint(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (model_dir / "config.json").write_text(json.dumps(config))
    Checkpoint(model_dir)


@pytest.mark.parametrize(
    "family,field,value,message",
    [
        ("deepseek_v3", "n_group", 3, r"n_routed_experts \(8\) must be a multiple of n_group \(3\)"),
        ("deepseek_v3", "topk_group", 5, r"topk_group \(5\) exceeds n_group \(4\)"),
        ("deepseek_v3", "qk_rope_head_dim", 7, r"qk_rope_head_dim must be even"),
        ("gpt_oss", "layer_types", ["sliding_attention", "chunked_attention", "full_attention"],
         r"layer_types entry 'chunked_attention' is not supported"),
        ("gpt_oss", "quantization_config", {"quant_method": "fp8"}, r"quant_method 'fp8' is not supported for gpt_oss"),
    ],
)
def test_invalid_family_config_fields(copies, family, field, value, message):
    model_dir = copies(family)
    config = json.loads((model_dir / "config.json").read_text())
    config[field] = value
    (model_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=message):
        Checkpoint(model_dir)


# ---- tiny checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_make_tiny_model_loads_and_generates(tmp_path, family):
    from transformers import AutoModelForCausalLM, Mxfp4Config

    out = tmp_path / family
    made = cli("make-tiny-model", str(out), "--family", family, "--seed", "2", "--layers", "2")
    assert made.returncode == 0, made.stderr
    generated = cli("generate", "--model", str(out), "--prompt", "The experts", "--max-tokens", "8", "--ignore-eos", "--json")
    assert generated.returncode == 0, generated.stderr
    record = json.loads(generated.stdout)
    assert len(record["token_ids"]) == 8 and isinstance(record["text"], str)
    # transformers reads the same directory (MXFP4 experts included) and picks the same tokens.
    extra = {"quantization_config": Mxfp4Config(dequantize=True), "dtype": torch.float32} if family == "gpt_oss" else {}
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", **extra).eval()
    with torch.no_grad():
        reference = model.generate(torch.tensor([record["prompt_token_ids"]]), max_new_tokens=8, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)
    assert reference[0, len(record["prompt_token_ids"]):].tolist() == record["token_ids"]
