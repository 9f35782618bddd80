"""The built-in demo model: a small Mixtral that writes English, shipped with the package.

It is a real Hugging Face checkpoint (config.json, model.safetensors, a byte-level BPE tokenizer with
a chat template) of the same family and format as `make-tiny-model` writes, but trained: on the
prose of Python's standard library, for a few CPU minutes, by scripts/train_demo.py (which documents
how to rebuild it). `resilient-moe generate` and `serve` use it when no --model is given.
"""

from __future__ import annotations

from pathlib import Path

from resilient_moe.errors import CheckpointError

DEMO_DIR = Path(__file__).resolve().parent / "demo_checkpoint"


def demo_model_dir() -> Path:
    """The shipped demo checkpoint's directory."""
    if not (DEMO_DIR / "model.safetensors").is_file():
        raise CheckpointError(f"the built-in demo checkpoint is missing from {DEMO_DIR}: reinstall resilient-moe, or "
                              f"rebuild it with `python scripts/train_demo.py --out {DEMO_DIR}`")
    return DEMO_DIR
