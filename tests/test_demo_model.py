"""The built-in demo model: a real HF Mixtral checkpoint that ships with the package, speaks readable
English for the README's first command, matches transformers, and can be rebuilt by its script."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import torch

from resilient_moe.engine.config import EngineConfig, SamplingParams
from resilient_moe.engine.engine import LLMEngine
from resilient_moe.model.demo import demo_model_dir

ROOT = Path(__file__).resolve().parent.parent


def test_readme_first_command_prints_readable_words():
    """`resilient-moe generate --prompt "Hello"`, as the README runs it: no U+FFFD, mostly words."""
    result = subprocess.run([sys.executable, "-m", "resilient_moe.cli", "generate", "--prompt", "Hello"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    assert "\ufffd" not in text and text.isprintable(), repr(text)
    words = text.split()
    alphabetic = [w for w in words if re.fullmatch(r"[A-Za-z]+(?:'[a-z]+)?[.,!?;:]?", w)]
    assert len(words) >= 3 and len(alphabetic) >= 0.8 * len(words), repr(text)


def test_demo_checkpoint_is_a_small_hf_mixtral_that_matches_transformers():
    from transformers import AutoModelForCausalLM

    path = demo_model_dir()
    assert json.loads((path / "config.json").read_text())["model_type"] == "mixtral"
    assert sum(f.stat().st_size for f in path.iterdir()) <= 20 << 20
    engine = LLMEngine(path, EngineConfig())
    prompt = engine.tokenizer.encode("The module provides")
    ours = engine.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_train_script_writes_a_loadable_checkpoint(tmp_path):
    """A few steps on a few stdlib files: the same script that made the shipped model still works."""
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_demo.py"), "--out", str(out), "--steps", "2",
                             "--batch", "2", "--seq-len", "32", "--max-files", "8", "--log-every", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"^step\s+1\s+loss", result.stdout, re.M), result.stdout
    engine = LLMEngine(out, EngineConfig())
    assert len(engine.generate([engine.tokenizer.encode("Hello")], SamplingParams(max_tokens=3, ignore_eos=True))[0]
               .token_ids) == 3
