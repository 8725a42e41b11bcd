"""LoRA policies (model.lora; tspo_fast/training/lora.py): only adapters train, the rollout engine
receives merged weights (vLLM's greedy output equals HF's on the merged model), checkpoints hold
the adapters, export writes merged or adapter-only weights, resume is exact, world size 1 = 2."""
from __future__ import annotations

import contextlib
import json
import os
import sys

import pytest
import torch

peft = pytest.importorskip("peft")

from _procs import torchrun
from test_trainer import SMALL, _metrics, _rows_by, _run

from tspo_fast.config import load_config
from tspo_fast.engines import SamplingConfig
from tspo_fast.engines.hf import HFEngine
from tspo_fast.engines.sync import sync_weights
from tspo_fast.models import load_causal_lm
from tspo_fast.models.tiny import TinyModelSpec, build_tiny_model, load_tokenizer
from tspo_fast.training.lora import apply_lora, merged_weight_entries
from tspo_fast.training.policy import FusedHeadPolicy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LORA = ["model.lora.rank=4", "model.lora.alpha=8"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("lora") / "m"), spec=TinyModelSpec(seed=3))


def _adapted(tiny_dir):
    cfg = load_config(None, LORA)
    torch.manual_seed(0)
    model = apply_lora(load_causal_lm(tiny_dir), cfg.model.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)                   # as if trained: B starts at 0
    return model


def test_merged_entries_equal_peft_merge_and_go_into_vllm(tiny_dir):
    """The sync's merged weights are PEFT's own merge; vLLM loaded with them generates greedily
    exactly what HF generates with the merged model."""
    model = _adapted(tiny_dir)
    sent = {name: fn([p.detach() for p in params]) for name, params, fn in merged_weight_entries(model)}
    reference = {k: v for k, v in model.merge_and_unload().state_dict().items()}
    assert set(sent) <= set(reference) and len(sent) >= len(reference) - 1     # a tied head is sent once
    for k, v in sent.items():
        torch.testing.assert_close(v, reference[k], rtol=0, atol=1e-6, msg=k)
    tok = load_tokenizer(tiny_dir)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Question: who is Paris", "Doc 1", "x y")]
    greedy = SamplingConfig(temperature=0, max_new_tokens=16)
    merged_lm = load_causal_lm(tiny_dir)
    merged_lm.load_state_dict(reference, strict=False)
    want = [g.token_ids for g in HFEngine(merged_lm, tok).generate(prompts, greedy)]
    base_out = [g.token_ids for g in HFEngine(load_causal_lm(tiny_dir), tok).generate(prompts, greedy)]
    assert want != base_out                                                   # the adapters matter
    hf = HFEngine(load_causal_lm(tiny_dir), tok)
    sync_weights(hf, merged_weight_entries(_adapted(tiny_dir)), bucket_mb=0.05)
    assert [g.token_ids for g in hf.generate(prompts, greedy)] == want
    pytest.importorskip("vllm")
    from tspo_fast.engines.vllm import VLLMEngine
    eng = VLLMEngine(tiny_dir, max_model_len=256)
    try:
        stats = sync_weights(eng, merged_weight_entries(_adapted(tiny_dir)), bucket_mb=0.05)
        assert stats.num_buckets > 1
        assert [g.token_ids for g in eng.generate(prompts, greedy)] == want
    finally:
        eng.close()


@pytest.mark.slow
def test_lora_update_same_on_one_and_two_ranks_and_touches_adapters_only(train_env, tmp_path, tiny_dir):
    outs = {}
    for name, launcher in (("ws1", [sys.executable]),
                           ("ws2", torchrun())):
        outs[name] = str(tmp_path / f"{name}.pt")
        _run(launcher + ["tests/_update_step.py", "--model", tiny_dir, "--micro", "2", "--out", outs[name],
                         "--lora", "4", "--packing", "64"], train_env)
    a, b = torch.load(outs["ws1"]), torch.load(outs["ws2"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2e-6, msg=k)
    base = load_causal_lm(tiny_dir).state_dict()
    for k, v in a.items():                     # "lm.base_model.model.<hf name with .base_layer>"
        hf = k[len("lm.base_model.model."):].replace(".base_layer.", ".")
        if ".lora_" not in k:
            torch.testing.assert_close(v, base[hf], rtol=0, atol=0, msg=f"frozen {k} moved")
    assert any(".lora_" in k for k in a)


@pytest.mark.slow
def test_lora_run_exports_resumes_and_keeps_only_adapters(train_env, tmp_path):
    # lr 0.01 moves the weights hard on purpose: the guard's update-size check (train.max_update_kl) is off
    common = SMALL + LORA + ["rollout.engine=hf", "train.eval_every=0", "train.lr=0.01", "loss.entropy_coef=0.01",
                             "train.total_steps=2", "train.max_update_kl=0"]
    sets = lambda out: [x for s in common + [f"output_dir={out}"] for x in ("--set", s)]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets(a), "--export", f"{a}/merged",
          "--no-plot"], train_env)
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets(b), "--max-steps", "1",
          "--no-plot"], train_env)
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/tiny.yaml", *sets(b), "--resume",
          "--export", f"{b}/adapter", "--export-format", "adapter", "--no-plot"], train_env)
    rows = _metrics(a)
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss/pg"] != rows[1]["loss/pg"]
    # the checkpoint holds the adapters, not the base model
    states = torch.load(os.path.join(a, "checkpoints", "step_000002", "ds", "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                        weights_only=False)
    module = states["module"]
    assert any(".lora_" in n for n in module)
    assert all(".lora_" in n or t.numel() == 0 for n, t in module.items())   # (a tied head: an empty placeholder)
    # adapter-only export of the resumed run, merged onto the base, equals the straight run's merged export
    from safetensors.torch import load_file

    from tspo_fast.models import resolve_model_path
    assert os.path.exists(os.path.join(b, "adapter", "adapter_config.json"))
    base = load_causal_lm(resolve_model_path("bundled:warmstart"))
    resumed = peft.PeftModel.from_pretrained(base, os.path.join(b, "adapter")).merge_and_unload().state_dict()
    straight = load_file(os.path.join(a, "merged", "model.safetensors"))
    assert json.load(open(os.path.join(a, "merged", "config.json")))["model_type"] == "qwen2"
    for k, v in straight.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=1e-5, msg=k)
    init = load_causal_lm(resolve_model_path("bundled:warmstart")).state_dict()
    assert max((straight[k] - init[k]).abs().max().item() for k in straight) > 1e-5      # it learnt something


# ----------------------------------------------------------------------------- the frozen trunk
def _deep_lm(family: str, path: str):
    """A 4-layer model of ``family`` (qwen2: the tiny builder's; llama: random, tied head) with LoRA
    on its top 2 layers, the adapters moved off their zero start."""
    if family == "qwen2":
        lm = load_causal_lm(path)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(4)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=load_causal_lm(path).config.vocab_size, hidden_size=64,
                                          intermediate_size=128, num_hidden_layers=4, num_attention_heads=2,
                                          num_key_value_heads=1, tie_word_embeddings=True))
    torch.manual_seed(0)
    model = apply_lora(lm, load_config(None, LORA + ["model.lora.top_layers=2"]).model.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def deep_dir(tmp_path_factory):
    spec = TinyModelSpec(hidden_size=64, num_layers=4, num_heads=2, num_kv_heads=1, intermediate_size=128, seed=5)
    return build_tiny_model(str(tmp_path_factory.mktemp("trunk") / "m"), spec=spec)


def test_frozen_trunk_depth_counts_the_untrained_bottom(deep_dir):
    from tspo_fast.training.policy import frozen_trunk_depth
    assert frozen_trunk_depth(load_causal_lm(deep_dir)) == 0                     # full fine-tuning
    assert frozen_trunk_depth(_deep_lm("qwen2", deep_dir)) == 2                  # LoRA on the top 2 of 4
    assert frozen_trunk_depth(apply_lora(load_causal_lm(deep_dir), load_config(None, LORA).model.lora)) == 0
    dropping = _deep_lm("qwen2", deep_dir)
    dropping.config.attention_dropout = 0.1                                     # a trunk that drops out differs per pass
    assert frozen_trunk_depth(dropping) == 0
    with pytest.raises(ValueError, match="frozen_trunk=4"):
        FusedHeadPolicy(load_causal_lm(deep_dir), frozen_trunk=4)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_passes_from_the_frozen_trunk_equal_full_passes(deep_dir, family, packing, checkpointing):
    """Log-probs (adapters on and off: pi and pi_ref), the loss and every adapter's gradient are the
    same, bit for bit, whether a pass runs the whole model or starts from the kept trunk."""
    from test_packing import _batch

    from tspo_fast.training.lora import disabled_adapters
    from tspo_fast.training.packing import micro_batches
    from tspo_fast.training.policy import FusedHeadPolicy, frozen_trunk_depth

    lm = _deep_lm(family, deep_dir)
    if checkpointing:
        lm.gradient_checkpointing_enable()
        lm.enable_input_require_grads()
    pol = FusedHeadPolicy(lm, chunk_size=16, packing=packing, frozen_trunk=frozen_trunk_depth(lm))
    assert pol.frozen_trunk == 2
    batch, adv = _batch(lm.config.vocab_size, seed=2)
    mbs = micro_batches(batch, list(range(len(batch))), adv, None, packing=packing, budget=48, micro_size=3,
                        device="cpu")
    assert len(mbs) > 1
    for mb in mbs:
        inputs = mb.model_inputs()
        pol.eval()
        trunk = pol(**inputs, mode="trunk")
        assert trunk.shape == (*mb.input_ids.shape, 64) and not trunk.requires_grad
        for adapters in (True, False):
            with torch.no_grad(), (contextlib.nullcontext() if adapters else disabled_adapters(lm)):
                full, _ = pol(**inputs, mode="logprobs")
                cut, _ = pol(**inputs, mode="logprobs", trunk=trunk)
            assert torch.equal(full, cut), (adapters, (full - cut).abs().max())
        pol.train()
        grads = []
        for t in (None, trunk):
            pol.zero_grad()
            out = pol(**inputs, mode="loss", old_logp=None, advantages=mb.advantages, normalizer=10.0, beta=0.0,
                      trunk=t)
            out.loss.backward()
            grads.append((out.loss.detach(), {n: p.grad.clone() for n, p in pol.named_parameters()
                                             if p.grad is not None}))
        (la, ga), (lb, gb) = grads
        assert torch.equal(la, lb)
        assert ga.keys() == gb.keys() and ga and all(".lora_" in n for n in ga)
        for n in ga:
            assert torch.equal(ga[n], gb[n]), n


@pytest.mark.slow
def test_trainer_with_a_frozen_trunk_logs_what_it_logs_without(train_env, tmp_path):
    """LoRA on the top 2 of 4 layers with the KL pass (pi_ref = adapters off), under ZeRO-3: keeping the
    frozen layers' output changes no metric of two steps (the second samples from the first's update)."""
    common = SMALL + LORA + ["model.lora.top_layers=2", "loss.kl_coef=0.05", "rollout.engine=hf",
                             "train.eval_every=0", "train.checkpoint_every=0", "train.total_steps=2"]
    rows = _rows_by(train_env, tmp_path, common, "model.lora.share_frozen")
    assert [r["step"] for r in rows["true"]] == [1, 2]
    for a, b in zip(rows["true"], rows["false"]):
        assert a["loss/kl"] > 0 or a["step"] == 1            # pi moved away from pi_ref after step 1
        for k in a:
            if not k.startswith("time/") and k != "train/tokens_per_s" and isinstance(a[k], (int, float)):
                assert a[k] == b[k], (a["step"], k, a[k], b[k])
