"""The command line, end to end in subprocesses: outputs and error messages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "resilient_moe.cli", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "qwen3"
    result = cli("make-tiny-model", str(out), "--family", "qwen3_moe", "--seed", "3", "--layers", "2")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"}
    return out


def test_generate_json_single_and_batch(cli_model):
    one = cli("generate", "--model", str(cli_model), "--prompt-ids", "1,5,9", "--max-tokens", "6", "--ignore-eos", "--json")
    assert one.returncode == 0, one.stderr
    record = json.loads(one.stdout)
    assert record["prompt_token_ids"] == [1, 5, 9] and len(record["token_ids"]) == 6
    batch = cli("generate", "--model", str(cli_model), "--prompt", "Hello world", "--prompt-ids", "1,5,9",
                "--max-tokens", "6", "--ignore-eos", "--json")
    assert batch.returncode == 0, batch.stderr
    records = json.loads(batch.stdout)
    assert isinstance(records, list) and len(records) == 2
    assert records[1]["token_ids"] == record["token_ids"], "a batch must not change a request's tokens"
    assert records[0]["prompt_token_ids"][0] == 1 and isinstance(records[0]["text"], str)


def test_generate_text_output(cli_model):
    result = cli("generate", "--model", str(cli_model), "--prompt", "The experts", "--max-tokens", "4")
    assert result.returncode == 0 and result.stdout.strip() != ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--prompt-ids", "1,x"], "'x' is not an integer token id"),
        (["--prompt-ids", "1,99999"], "prompt token id 99999 is outside the vocabulary"),
        (["--prompt-ids", "1", "--temperature", "-2"], "temperature must be between 0 and 100"),
        (["--prompt-ids", "1", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["--prompt-ids", "1", "--max-tokens", "0"], "must be a positive integer"),
        (["--prompt-ids", "1", "--dtype", "int8"], "invalid choice: 'int8'"),
        ([], "give at least one --prompt TEXT or --prompt-ids"),
    ],
)
def test_generate_bad_input_messages(cli_model, args, message):
    result = cli("generate", "--model", str(cli_model), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_bad_model_dir(tmp_path):
    result = cli("generate", "--model", str(tmp_path / "nope"), "--prompt-ids", "1")
    assert result.returncode == 2 and "does not exist or is not a directory" in result.stderr
    (tmp_path / "empty").mkdir()
    result = cli("generate", "--model", str(tmp_path / "empty"), "--prompt-ids", "1")
    assert "config.json: not found" in result.stderr and "Traceback" not in result.stderr


def test_text_prompt_without_tokenizer(tmp_path, hf_checkpoints):
    result = cli("generate", "--model", str(hf_checkpoints["mixtral"]), "--prompt", "hi")
    assert result.returncode == 2 and "has no tokenizer.json" in result.stderr
    ids = cli("generate", "--model", str(hf_checkpoints["mixtral"]), "--prompt-ids", "1,2,3", "--max-tokens", "3", "--json")
    assert ids.returncode == 0 and json.loads(ids.stdout)["text"] == ""


def test_make_tiny_model_bad_input(tmp_path):
    result = cli("make-tiny-model", str(tmp_path / "m"), "--family", "gpt2")
    assert result.returncode == 2 and "invalid choice: 'gpt2'" in result.stderr
    result = cli("make-tiny-model", str(tmp_path / "m"), "--family", "mixtral", "--heads", "3")
    assert result.returncode == 2 and "--hidden-size (64) must be a multiple of --heads (3)" in result.stderr
