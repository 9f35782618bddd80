"""Hugging Face checkpoint reading, by the tensor names as they are on disk.

`TensorNames` lists every tensor a family's checkpoint holds (with its shape), split into the
attention side and the per-(layer, expert) tensors of the expert side. `Checkpoint` indexes the
safetensors files (single file, several files, or a sharded index), checks the whole checkpoint
against the names once (missing, unexpected, mis-shaped tensors), then loads any subset: an expert
worker reads only its own experts' tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from resilient_moe.config import ModelConfig
from resilient_moe.errors import CheckpointError

# Tensors that some exporters write but no family reads.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ExpertTensorNames:
    """On-disk names of one expert's three projections in one layer."""

    gate: str  # [F, D]
    up: str  # [F, D]
    down: str  # [D, F]


class TensorNames:
    """Every tensor of a checkpoint, by on-disk name, with its expected shape."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        D, H, G, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,)}
        if not cfg.tie_word_embeddings:
            shapes["lm_head.weight"] = (cfg.vocab_size, D)
        self.expert_shapes: dict[tuple[int, int], dict[str, tuple[int, ...]]] = {}
        for layer in range(cfg.num_layers):
            p = f"model.layers.{layer}"
            shapes[f"{p}.input_layernorm.weight"] = (D,)
            shapes[f"{p}.post_attention_layernorm.weight"] = (D,)
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
            if not cfg.sparse_layers[layer]:
                F_dense = cfg.intermediate_size
                shapes[f"{p}.mlp.gate_proj.weight"] = (F_dense, D)
                shapes[f"{p}.mlp.up_proj.weight"] = (F_dense, D)
                shapes[f"{p}.mlp.down_proj.weight"] = (D, F_dense)
                continue
            shapes[self.router(layer)] = (cfg.num_experts, D)
            if cfg.shared_expert_intermediate_size:
                F_shared = cfg.shared_expert_intermediate_size
                shapes[f"{p}.mlp.shared_expert.gate_proj.weight"] = (F_shared, D)
                shapes[f"{p}.mlp.shared_expert.up_proj.weight"] = (F_shared, D)
                shapes[f"{p}.mlp.shared_expert.down_proj.weight"] = (D, F_shared)
                shapes[f"{p}.mlp.shared_expert_gate.weight"] = (1, D)
            F_moe = cfg.moe_intermediate_size
            for expert in range(cfg.num_experts):
                names = self.expert(layer, expert)
                self.expert_shapes[(layer, expert)] = {
                    names.gate: (F_moe, D),
                    names.up: (F_moe, D),
                    names.down: (D, F_moe),
                }
        self.attention_shapes = shapes

    def router(self, layer: int) -> str:
        if self.cfg.family == "mixtral":
            return f"model.layers.{layer}.block_sparse_moe.gate.weight"
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert(self, layer: int, expert: int) -> ExpertTensorNames:
        if self.cfg.family == "mixtral":
            p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
            return ExpertTensorNames(gate=f"{p}.w1.weight", up=f"{p}.w3.weight", down=f"{p}.w2.weight")
        p = f"model.layers.{layer}.mlp.experts.{expert}"
        return ExpertTensorNames(gate=f"{p}.gate_proj.weight", up=f"{p}.up_proj.weight", down=f"{p}.down_proj.weight")

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
            actual = self._shape(name)
            if actual != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has shape {list(actual)}, expected {list(shape)} from config.json"
                )

    def _shape(self, name: str) -> tuple[int, ...]:
        with safe_open(str(self._file_of[name]), framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def load(self, names: list[str], dtype: torch.dtype, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read the named tensors (grouped by file), converted to `dtype` on `device`."""
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
                        out[name] = f.get_tensor(name).to(dtype=dtype, device=device)
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read tensor data ({e})") from None
        return out

    def has(self, name: str) -> bool:
        return name in self._file_of
