"""Hugging Face checkpoint reading, by the tensor names as they are on disk.

`TensorNames` lists every tensor a family's checkpoint holds (with its shape), split into the
attention side and the per-(layer, expert) tensors of the expert side. `Checkpoint` indexes the
safetensors files (single file, several files, or a sharded index), checks the whole checkpoint
against the names once (missing, unexpected, mis-shaped tensors), then loads any subset: an expert
worker reads only its own experts' tensors (its rows of layer-wide tensors, where a family stores
all experts of a layer in one tensor, dequantizing MXFP4 as it reads).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from resilient_moe.model.config import ModelConfig
from resilient_moe.errors import CheckpointError
from resilient_moe.model import mxfp4
from resilient_moe.model.families import MXFP4_BLOCK

# Tensors that some exporters write but no family reads.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ExpertTensorNames:
    """On-disk names of one expert's weights in one layer, by the family's storage layout.

    * separate: `gate_up` = (gate [F, D], up [F, D]) and `down` = (down [D, F],), this expert's own.
    * fused (GPT-OSS): layer-wide tensors holding every expert, this one at row `index`:
      `gate_up` = (gate_up [E, D, 2F],) with gate and up interleaved along 2F, `down` = (down [E, F, D],).
    * mxfp4 (released GPT-OSS): the same weights stored [out, in] as MXFP4: `gate_up` = (blocks
      [E, 2F, D/32, 16], scales [E, 2F, D/32]), `down` = (blocks [E, D, F/32, 16], scales [E, D, F/32]).
    The fused layouts carry biases gate_up_bias [E, 2F] (interleaved too) and down_bias [E, D].
    """

    layout: str
    gate_up: tuple[str, ...]
    down: tuple[str, ...]
    gate_up_bias: str | None = None
    down_bias: str | None = None
    index: int = 0

    @property
    def all(self) -> list[str]:
        return [*self.gate_up, *self.down, *(n for n in (self.gate_up_bias, self.down_bias) if n is not None)]


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's weights as the expert side uses them, whatever the layout on disk."""

    gate_up: torch.Tensor  # [2F, D]: the F gate rows, then the F up rows
    down: torch.Tensor  # [D, F]
    gate_up_bias: torch.Tensor | None = None  # [2F], same order
    down_bias: torch.Tensor | None = None  # [D]


@dataclass(frozen=True)
class SharedExpertNames:
    """Where a layer's shared expert lives: `prefix`.{gate,up,down}_proj.weight, and a sigmoid gate
    [1, D] (Qwen2-MoE) or none (DeepSeek-V3)."""

    prefix: str
    gate: str | None


class TensorNames:
    """Every tensor of a checkpoint, by on-disk name, with its expected shape."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        D = cfg.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, D)
        self.expert_shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
        self.uint8_names: set[str] = set()  # MXFP4 blocks and scales
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}"
            shapes[f"{p}.input_layernorm.weight"] = (D,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
            if cfg.mla is not None:
                shapes.update(self._latent_attention_shapes(p))
            else:
                shapes.update(self._attention_shapes(p))
            if not cfg.sparse_layers[layer]:
                F_dense = cfg.intermediate_size
                shapes[f"{p}.mlp.gate_proj.weight"] = (F_dense, D)
                shapes[f"{p}.mlp.up_proj.weight"] = (F_dense, D)
                shapes[f"{p}.mlp.down_proj.weight"] = (D, F_dense)
                continue
            shapes[self.router(layer)] = (cfg.num_experts, D)
            for name in (self.router_bias(layer), self.correction_bias(layer)):
                if name is not None:
                    shapes[name] = (cfg.num_experts,)
            shared = self.shared_expert(layer)
            if shared is not None:
                F_shared = cfg.shared_expert_intermediate_size
                shapes[f"{shared.prefix}.gate_proj.weight"] = (F_shared, D)
                shapes[f"{shared.prefix}.up_proj.weight"] = (F_shared, D)
                shapes[f"{shared.prefix}.down_proj.weight"] = (D, F_shared)
                if shared.gate is not None:
                    shapes[shared.gate] = (1, D)
            for expert in range(cfg.num_experts):
                self.expert_shapes[(layer, expert)] = self._expert_shapes(self.expert(layer, expert))
        self.attention_shapes = shapes

    def _attention_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        cfg = self.cfg
        D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {}
        for proj, rows in (("q_proj", H * d), ("k_proj", G * d), ("v_proj", G * d)):
            shapes[f"{p}.self_attn.{proj}.weight"] = (rows, D)
            if cfg.qkv_bias:
                shapes[f"{p}.self_attn.{proj}.bias"] = (rows,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (D, H * d)
        if cfg.o_bias:
            shapes[f"{p}.self_attn.o_proj.bias"] = (D,)
        if cfg.qk_norm == "head":
            shapes[f"{p}.self_attn.q_norm.weight"] = (d,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (d,)
        elif cfg.qk_norm == "full":
            shapes[f"{p}.self_attn.q_norm.weight"] = (H * d,)
            shapes[f"{p}.self_attn.k_norm.weight"] = (G * d,)
        if cfg.attention_sinks:
            shapes[f"{p}.self_attn.sinks"] = (H,)
        return shapes

    def _latent_attention_shapes(self, p: str) -> dict[str, tuple[int, ...]]:
        cfg, mla = self.cfg, self.cfg.mla
        assert mla is not None
        D, H = cfg.hidden_size, cfg.num_heads
        a = f"{p}.self_attn"
        shapes: dict[str, tuple[int, ...]] = {}
        if mla.q_lora_rank is None:
            shapes[f"{a}.q_proj.weight"] = (H * mla.qk_head_dim, D)
        else:
            shapes[f"{a}.q_a_proj.weight"] = (mla.q_lora_rank, D)
            shapes[f"{a}.q_a_layernorm.weight"] = (mla.q_lora_rank,)
            shapes[f"{a}.q_b_proj.weight"] = (H * mla.qk_head_dim, mla.q_lora_rank)
            if mla.bias:
                shapes[f"{a}.q_a_proj.bias"] = (mla.q_lora_rank,)
        shapes[f"{a}.kv_a_proj_with_mqa.weight"] = (mla.latent_width, D)
        shapes[f"{a}.kv_a_layernorm.weight"] = (mla.kv_lora_rank,)
        shapes[f"{a}.kv_b_proj.weight"] = (H * (mla.qk_nope_head_dim + mla.v_head_dim), mla.kv_lora_rank)
        shapes[f"{a}.o_proj.weight"] = (D, H * mla.v_head_dim)
        if mla.bias:
            shapes[f"{a}.kv_a_proj_with_mqa.bias"] = (mla.latent_width,)
            shapes[f"{a}.o_proj.bias"] = (D,)
        return shapes

    def _expert_shapes(self, names: ExpertTensorNames) -> dict[str, tuple[int, ...]]:
        E, D, F = self.cfg.num_experts, self.cfg.hidden_size, self.cfg.moe_intermediate_size
        if names.layout == "separate":
            gate, up = names.gate_up
            return {gate: (F, D), up: (F, D), names.down[0]: (D, F)}
        assert names.gate_up_bias is not None and names.down_bias is not None
        shapes = {names.gate_up_bias: (E, 2 * F), names.down_bias: (E, D)}
        if names.layout == "fused":
            shapes.update({names.gate_up[0]: (E, D, 2 * F), names.down[0]: (E, F, D)})
            return shapes
        half = MXFP4_BLOCK // 2
        (gu_blocks, gu_scales), (down_blocks, down_scales) = names.gate_up, names.down
        shapes.update({
            gu_blocks: (E, 2 * F, D // MXFP4_BLOCK, half), gu_scales: (E, 2 * F, D // MXFP4_BLOCK),
            down_blocks: (E, D, F // MXFP4_BLOCK, half), down_scales: (E, D, F // MXFP4_BLOCK),
        })
        self.uint8_names.update((gu_blocks, gu_scales, down_blocks, down_scales))
        return shapes

    def router(self, layer: int) -> str:
        family = self.cfg.family
        if family == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.gate.weight"
        if family == "gpt_oss":
            return f"model.layers.{layer}.mlp.router.weight"
        return f"model.layers.{layer}.mlp.gate.weight"

    def router_bias(self, layer: int) -> str | None:
        return f"model.layers.{layer}.mlp.router.bias" if self.cfg.router.bias else None

    def correction_bias(self, layer: int) -> str | None:
        """DeepSeek-V3's per-expert bias, added to the scores for choosing experts only."""
        if self.cfg.router.scoring != "sigmoid_grouped":
            return None
        return f"model.layers.{layer}.mlp.gate.e_score_correction_bias"

    def shared_expert(self, layer: int) -> SharedExpertNames | None:
        if not self.cfg.shared_expert_intermediate_size:
            return None
        if self.cfg.family == "deepseek_v3":
            return SharedExpertNames(f"model.layers.{layer}.mlp.shared_experts", None)
        return SharedExpertNames(f"model.layers.{layer}.mlp.shared_expert", f"model.layers.{layer}.mlp.shared_expert_gate.weight")

    def expert(self, layer: int, expert: int) -> ExpertTensorNames:
        layout = self.cfg.experts.layout
        if self.cfg.family == "mixtral":
            p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            return ExpertTensorNames(layout, gate_up=(f"{p}.w1.weight", f"{p}.w3.weight"), down=(f"{p}.w2.weight",))
        if layout == "separate":
            p = f"model.layers.{layer}.mlp.experts.{expert}"
            return ExpertTensorNames(
                layout, gate_up=(f"{p}.gate_proj.weight", f"{p}.up_proj.weight"), down=(f"{p}.down_proj.weight",)
            )
        p = f"model.layers.{layer}.mlp.experts"
        if layout == "fused":
            gate_up, down = (f"{p}.gate_up_proj",), (f"{p}.down_proj",)
        else:
            gate_up = (f"{p}.gate_up_proj_blocks", f"{p}.gate_up_proj_scales")
            down = (f"{p}.down_proj_blocks", f"{p}.down_proj_scales")
        return ExpertTensorNames(layout, gate_up, down, f"{p}.gate_up_proj_bias", f"{p}.down_proj_bias", expert)

    @property
    def float32_names(self) -> set[str]:
        """Tensors read in float32 whatever the engine's dtype: DeepSeek-V3 routes in float32."""
        if self.cfg.router.scoring != "sigmoid_grouped":
            return set()
        return {name for layer in self.cfg.sparse_layer_ids
                for name in (self.router(layer), self.correction_bias(layer)) if name is not None}

    def unused(self, name: str) -> bool:
        """True for tensors of layers the checkpoint stores but the runtime does not run (cfg.unused_layers)."""
        if not self.cfg.unused_layers or not name.startswith("model.layers."):
            return False
        index = name.split(".")[2]
        return index.isdigit() and self.cfg.num_layers <= int(index) < self.cfg.num_layers + self.cfg.unused_layers

    def all_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.attention_shapes)
        for per_expert in self.expert_shapes.values():
            shapes.update(per_expert)
        return shapes


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise CheckpointError(f"unsupported dtype {name!r} (supported: {', '.join(_DTYPES)})")
    return _DTYPES[name]


class Checkpoint:
    """A validated HF checkpoint directory; loads tensors by name, converted to one dtype."""

    def __init__(self, model_dir: str | os.PathLike[str], cfg: ModelConfig | None = None) -> None:
        self.path = Path(model_dir)
        self.cfg = cfg or ModelConfig.from_pretrained(self.path)
        self.names = TensorNames(self.cfg)
        self._file_of = self._index_files()
        self.bytes_read = 0  # tensor bytes read so far: a loading worker reports it as its progress
        self._validate()

    def _index_files(self) -> dict[str, Path]:
        index_path = self.path / "model.safetensors.index.json"
        file_of: dict[str, Path] = {}
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, AssertionError, UnicodeDecodeError):
                raise CheckpointError(f"{index_path}: not a valid sharded index (needs a 'weight_map' object)") from None
            files = sorted({self.path / str(f) for f in weight_map.values()})
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files found")
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index_path}: shard {file.name} is listed but missing")
            for name in self._keys(file):
                if name in file_of:
                    raise CheckpointError(f"tensor {name!r} appears in both {file_of[name].name} and {file.name}")
                file_of[name] = file
        return file_of

    @staticmethod
    def _keys(file: Path) -> list[str]:
        try:
            with safe_open(str(file), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises several types for a damaged header
            raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None

    def _validate(self) -> None:
        expected = self.names.all_shapes()
        optional = {"lm_head.weight"} if self.cfg.tie_word_embeddings else set()
        unexpected = sorted(
            n for n in self._file_of
            if n not in expected and n not in optional and not n.endswith(_IGNORED_SUFFIXES)
            and not self.names.unused(n)
        )
        if unexpected:
            more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
            raise CheckpointError(
                f"{self.path}: unexpected tensor {unexpected[0]!r}{more} for a {self.cfg.family} checkpoint "
                "with this config.json"
            )
        missing = sorted(n for n in expected if n not in self._file_of)
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{self.path}: missing tensor {missing[0]!r}{more}")
        for name, shape in expected.items():
            actual, dtype = self._shape_and_dtype(name)
            if actual != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has shape {list(actual)}, expected {list(shape)} from config.json"
                )
            if name in self.names.uint8_names and dtype != "U8":
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {dtype}, expected U8 (MXFP4)")

    def _shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            tensor = f.get_slice(name)
            return tuple(tensor.get_shape()), tensor.get_dtype()

    def load(self, names: list[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by file), converted to `dtype` on `device`."""
        return {name: t.to(dtype=dtype, device=device) for name, t in self._read(names).items()}

    def _read(self, names: list[str], row: int | None = None) -> dict[str, torch.Tensor]:
        """The named tensors as stored (or only their row `row` along the first dimension)."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self._file_of:
                raise CheckpointError(f"{self.path}: missing tensor {name!r}")
            by_file.setdefault(self._file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in file_names:
                        out[name] = f.get_tensor(name) if row is None else f.get_slice(name)[row]
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor data ({e})") from None
        self.bytes_read += sum(t.nbytes for t in out.values())
        return out

    def load_expert(self, names: ExpertTensorNames, dtype: torch.dtype, device: torch.device | str = "cpu") -> ExpertWeights:
        """One expert's weights in `dtype` on `device`, read (and dequantized) from whatever layout it has."""
        if names.layout == "separate":
            t = self.load(names.all, dtype, device)
            return ExpertWeights(torch.cat([t[n] for n in names.gate_up]), t[names.down[0]])
        rows = self._read(names.all, names.index)  # only this expert's rows of the layer-wide tensors
        if names.layout == "mxfp4":
            gate_up = mxfp4.dequantize(rows[names.gate_up[0]], rows[names.gate_up[1]])  # [2F, D]
            down = mxfp4.dequantize(rows[names.down[0]], rows[names.down[1]])  # [D, F]
        else:
            gate_up = rows[names.gate_up[0]].t()  # [D, 2F] -> [2F, D]
            down = rows[names.down[0]].t()  # [F, D] -> [D, F]
        assert names.gate_up_bias is not None and names.down_bias is not None

        def convert(t: torch.Tensor) -> torch.Tensor:
            return t.to(dtype=dtype, device=device).contiguous()

        # Gate and up rows alternate on disk; the expert side wants the gate rows, then the up rows.
        return ExpertWeights(
            gate_up=convert(_deinterleave(gate_up)),
            down=convert(down),
            gate_up_bias=convert(_deinterleave(rows[names.gate_up_bias])),
            down_bias=convert(rows[names.down_bias]),
        )

    def has(self, name: str) -> bool:
        return name in self._file_of


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """Rows (g0, u0, g1, u1, ...) -> (g0, g1, ..., u0, u1, ...) along the first dimension."""
    return torch.cat([t[0::2], t[1::2]])
