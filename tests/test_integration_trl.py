"""TSPO inside TRL's GRPOTrainer (tspo_fast.integrations.trl) with the real ``trl`` package.

Tiny Qwen2 models are built in the tests.  Most tests script the multi-turn search rollouts
through TRL's ``rollout_func`` (token ids + ``env_mask``), so TRL's own batching, reward and
training-step code runs unchanged on CPU; ``test_tools_*`` runs TRL's own tool-calling loop
(``tools=[search]``) with a policy taught to call the tool, the tool asking tspo-fast's
retrieval server on loopback, as the TRL snippet of docs/kernels.md writes it.
"""
import json
import os
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from datasets import Dataset
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer
from trl.chat_template_utils import qwen2_5_chat_template

import tspo_kernels
from tspo_fast.algo.rewards import outcome_reward
from tspo_fast.integrations.segments import turns_from_action_mask
from tspo_fast.integrations.trl import TSPOGRPOTrainer, outcome_reward_func
from tspo_fast.models.tiny import build_tiny_model, default_texts, load_tokenizer, train_tiny_lm, train_tokenizer
from tspo_fast.retrieval import InProcessRetriever, build_index
from tspo_fast.retrieval.server import BackgroundServer, create_app
from tspo_kernels import reference

ROOT = Path(__file__).resolve().parents[1]

# scripted trajectories: (action, observation) per turn; the last action answers.  Row r of a
# generation batch plays SCRIPTS[r % 4]; k* and R follow from the text by docs/algorithm.md §2.
SCRIPTS = [
    [("<search> capital of France </search>", "<information> Doc 1 Paris is the capital of France. </information>"),
     ("<answer> Paris </answer>", None)],                                    # k* = 0, R = 1, K = 2
    [("<search> capital </search>", "<information> Doc 1 Berlin is the capital of Germany. </information>"),
     ("<answer> Berlin </answer>", None)],                                   # k* = -1, R = 0, K = 2
    [("<search> germany </search>", "<information> Doc 1 Berlin is a city. </information>"),
     ("<search> france </search>", "<information> Doc 2 Paris is the capital. </information>"),
     ("<answer> Berlin </answer>", None)],                                   # k* = 1, R = 0, K = 3
    [("<answer> Rome </answer>", None)],                                     # k* = -1, R = 0, K = 1
]
EXPECTED = [(0, 1.0, 2), (-1, 0.0, 2), (1, 0.0, 3), (-1, 0.0, 1)]


def em_reward(completions, golden_answers, **_):
    out = []
    for text, gold in zip(completions, golden_answers):
        ans = text.rsplit("<answer>", 1)[-1].split("</answer>")[0].strip().lower() if "<answer>" in text else ""
        out.append(float(ans in [g.lower() for g in gold]))
    return out


def scripted_rollout(prompts, trainer):
    tok = trainer.processing_class
    out = {"prompt_ids": [], "completion_ids": [], "logprobs": None, "env_mask": []}
    for r, prompt in enumerate(prompts):
        ids, env = [], []
        for action, obs in SCRIPTS[r % len(SCRIPTS)]:
            a = tok.encode(" " + action, add_special_tokens=False)
            ids += a
            env += [1] * len(a)
            if obs is not None:
                o = tok.encode("\n" + obs + "\n", add_special_tokens=False)
                ids += o
                env += [0] * len(o)
        ids.append(tok.eos_token_id)
        env.append(1)
        out["prompt_ids"].append(tok.encode(prompt, add_special_tokens=False))
        out["completion_ids"].append(ids)
        out["env_mask"].append(env)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(str(tmp_path_factory.mktemp("trl_tiny") / "m"))


def make_trainer(tiny, tmp_path, cls=TSPOGRPOTrainer, reward=em_reward, **extra):
    data = Dataset.from_list([{"prompt": q, "golden_answers": ["Paris"]}
                              for q in ("Question: what is the capital of France?",
                                        "Question: which city is the capital of France?")])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=96, max_steps=1, learning_rate=1e-2, logging_steps=1, report_to="none",
                      save_strategy="no", use_cpu=True, bf16=False, loss_type="dapo", beta=0.0, epsilon_high=0.28,
                      seed=0, dataloader_num_workers=0, disable_tqdm=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    return cls(model=model, reward_funcs=[reward], args=args, train_dataset=data,
               processing_class=load_tokenizer(tiny), rollout_func=scripted_rollout, **extra)


def test_one_training_step_with_turn_level_advantages(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path, chunk_size=16, reward=outcome_reward_func("em"))
    seen = {}
    real = trainer._tspo_advantages

    def spy(inputs, out):
        adv = real(inputs, out)
        seen.update(out=dict(out), adv=adv, answers=[x["golden_answers"] for x in inputs])
        return adv

    trainer._tspo_advantages = spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    # the advantages are docs/algorithm.md §3's for the scripted (k*, R, K) of every row
    out, adv = seen["out"], seen["adv"]
    b = adv.shape[0]
    first, outcome, turns = (torch.tensor([EXPECTED[r % 4][i] for r in range(b)]) for i in range(3))
    action = out["completion_mask"].bool() & out["tool_mask"].bool()
    seg = turns_from_action_mask(action, out["completion_mask"])
    assert seg.num_turns.tolist() == turns.tolist()
    want, _ = reference.turn_advantages(outcome, first, turns, torch.arange(b) // 2, seg.turn_id, action)
    assert torch.allclose(adv, want, atol=1e-6)
    assert adv[action].abs().sum() > 0 and not adv[~action].any()

    logs = trainer.state.log_history[0]
    assert logs["rewards/tspo_outcome_em/mean"] == pytest.approx(sum(e[1] for e in EXPECTED) / len(EXPECTED))
    assert logs["tspo/folr_hit"] == pytest.approx(sum(e[0] >= 0 for e in EXPECTED) / len(EXPECTED))
    assert torch.isfinite(torch.tensor(logs["loss"]))
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    assert changed > 0


def _batch(trainer, g):
    """A padded TRL batch from the scripted rollout, old log-probs a little off-policy."""
    tok = trainer.processing_class
    prompts = ["Question: what is the capital of France?"] * 2 + ["Question: capital of France, please?"] * 2
    ro = scripted_rollout(prompts, trainer)
    P = max(len(p) for p in ro["prompt_ids"])
    C = max(len(c) for c in ro["completion_ids"])
    pad = tok.pad_token_id
    prompt_ids = torch.tensor([[pad] * (P - len(p)) + p for p in ro["prompt_ids"]])
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ro["prompt_ids"]])
    completion_ids = torch.tensor([c + [pad] * (C - len(c)) for c in ro["completion_ids"]])
    completion_mask = torch.tensor([[1] * len(c) + [0] * (C - len(c)) for c in ro["completion_ids"]])
    tool_mask = torch.tensor([m + [1] * (C - len(m)) for m in ro["env_mask"]])
    with torch.no_grad():
        logits = trainer.model(input_ids=torch.cat([prompt_ids, completion_ids], 1),
                               attention_mask=torch.cat([prompt_mask, completion_mask], 1)).logits
        logp_all = torch.log_softmax(logits[:, P - 1:-1] / trainer.temperature, -1)
        lp = logp_all.gather(-1, completion_ids[..., None])[..., 0]
    mask = completion_mask * tool_mask
    return {"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
            "completion_mask": completion_mask, "tool_mask": tool_mask,
            "old_per_token_logps": lp + 0.3 * torch.randn(lp.shape, generator=g),
            "ref_per_token_logps": lp + 0.1 * torch.randn(lp.shape, generator=g),
            "num_items_in_batch": mask.sum()}


@pytest.mark.parametrize("loss_type,kind", [("dapo", "sequence"), ("dapo", "turn"), ("dapo", "turn_kl"),
                                            ("dapo", "on_policy"), ("dapo", "tis"), ("grpo", "turn"),
                                            ("bnpo", "sequence"), ("dr_grpo", "turn_kl")])
def test_loss_equals_trl_loss(tiny, tmp_path, loss_type, kind):
    """Same batch, same advantages (one per sequence, or TSPO's per turn): K3's loss and gradients
    equal TRL's own GRPOTrainer._compute_loss for the same loss_type (dapo: TRL's token mean)."""
    trainer = make_trainer(tiny, tmp_path, advantage_mode="grpo")
    trainer.loss_type = loss_type
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    g = torch.Generator().manual_seed(5)
    inputs = _batch(trainer, g)
    B, C = inputs["completion_ids"].shape
    if kind == "on_policy":                         # no pi_old: TRL uses the current log-probs, detached
        del inputs["old_per_token_logps"]
    if kind == "tis":                               # vLLM sampling log-probs, TRL's "token_truncate" ratio
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
        trainer.vllm_importance_sampling_mode, trainer.vllm_importance_sampling_clip_max = "token_truncate", 1.5
        old = inputs["old_per_token_logps"]
        sampling = old + 0.5 * torch.randn(old.shape, generator=g)
        sampling[0, 1] = float("nan")               # a token vLLM could not score: ratio 1
        diff = torch.nan_to_num((old - sampling) * inputs["completion_mask"] * inputs["tool_mask"], nan=0.0)
        inputs["sampling_per_token_logps"] = sampling
        inputs["importance_sampling_ratio"] = torch.exp(diff).clamp(max=1.5)
    if kind in ("sequence", "on_policy", "tis"):
        inputs["advantages"] = torch.randn(B, generator=g)
    else:                                           # (B, C) turn-level advantages, as TSPO makes them
        mask = (inputs["completion_mask"] * inputs["tool_mask"]).bool()
        seg = turns_from_action_mask(mask, inputs["completion_mask"])
        inputs["advantages"], _ = reference.turn_advantages(
            torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0, -1, 1, -1]), seg.num_turns, torch.tensor([0, 0, 1, 1]),
            seg.turn_id, mask)
    if kind == "turn_kl":                           # k3 KL to the reference, as TRL without bias correction
        trainer.beta = 0.04
        trainer.args.use_bias_correction_kl = False

    def loss_and_grads(fn):
        trainer.model.zero_grad()
        loss = fn(trainer.model, inputs)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    ours, g_ours = loss_and_grads(lambda m, x: trainer.compute_loss(m, x))
    theirs, g_trl = loss_and_grads(lambda m, x: GRPOTrainer._compute_loss(trainer, m, x))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-7), (float(ours), float(theirs))
    assert g_ours.keys() == g_trl.keys() and g_ours
    for n in g_trl:
        err = (g_ours[n] - g_trl[n]).norm() / g_trl[n].norm().clamp(min=1e-12)
        assert err < 1e-4, (n, float(err))
    clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert clipped == 0 if kind == "on_policy" else clipped > 0             # the batch exercises clipping


def test_unsupported_options_raise(tiny, tmp_path):
    trainer = make_trainer(tiny, tmp_path)
    trainer.loss_type = "cispo"
    with pytest.raises(NotImplementedError, match="loss_type"):
        trainer._check_supported()


# ----------------------------------------------------------------------------- tools=[search], end to end
def docs_snippet(marker: str, lang: str = "python") -> str:
    """The first ``lang`` code block of docs/kernels.md after the line containing ``marker``."""
    text = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    block = re.compile(rf"```{lang}\n(.*?)```", re.S).search(text, text.index(marker))
    assert block is not None, f"docs/kernels.md: no {lang} block after {marker!r}"
    return block.group(1)


# (question, the query the policy is taught, gold answer, the policy's guess from memory)
TOOL_QA = [("What is the capital of France?", "capital of France", "Paris", "Berlin"),
           ("What is the capital of Germany?", "capital of Germany", "Berlin", "Rome"),
           ("What is the capital of Italy?", "capital of Italy", "Rome", "Madrid"),
           ("What is the capital of Spain?", "capital of Spain", "Madrid", "Paris")]


@pytest.fixture(scope="module")
def search_url(tmp_path_factory):
    """tspo-fast's retrieval server (BM25 over four passages) on loopback."""
    d = tmp_path_factory.mktemp("trl_search")
    with open(d / "corpus.jsonl", "w", encoding="utf-8") as f:
        for i, (_, query, gold, _) in enumerate(TOOL_QA):
            country = query.split(" of ")[1]
            f.write(json.dumps({"id": str(i), "contents": f'"{gold}"\n{gold} is the capital of {country}.'}) + "\n")
    build_index(str(d / "corpus.jsonl"), "bm25", str(d / "idx"), progress=False)
    with BackgroundServer(create_app(InProcessRetriever.from_dir(d / "idx"))) as server:
        yield server.url


def tool_calling_policy(folder: str, search) -> str:
    """A tiny Qwen2 taught (next-token loss on whole conversations) to answer each question of
    TOOL_QA in Qwen2.5's chat format, which TRL parses tool calls from, in one of two ways with
    about equal probability: one ``search`` tool call, then the gold answer read off the tool
    response; or a wrong guess from memory.  So a group of rollouts mixes both (TSPO has
    something to compare).  The tokenizer ends assistant turns with ``<|im_end|>`` (its EOS, as
    Qwen2.5-Instruct's)."""
    convs = []
    for q, query, gold, guess in TOOL_QA:
        call = {"type": "function", "function": {"name": "search", "arguments": {"query": query}}}
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": "", "tool_calls": [call]},
                      {"role": "tool", "name": "search", "content": search(query)},
                      {"role": "assistant", "content": f"<answer> {gold} </answer>"}])
        convs.append([{"role": "user", "content": q}, {"role": "assistant", "content": f"<answer> {guess} </answer>"}])
    render = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(default_texts()))
    render.chat_template = qwen2_5_chat_template
    texts = [render.apply_chat_template(c, tools=[search], tokenize=False) for c in convs]
    build_tiny_model(folder, default_texts() + texts * 10)
    tok = load_tokenizer(folder)
    tok.chat_template, tok.eos_token = qwen2_5_chat_template, "<|im_end|>"
    tok.save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(folder)
    loss = train_tiny_lm(folder, texts, steps=60, lr=3e-3)
    assert loss < 0.2, f"the tiny tool-calling policy did not fit its demonstrations (loss {loss:.3f})"
    return folder


@pytest.fixture
def one_thread():
    """Tiny matrices: one intra-op thread (several only spin against each other on a loaded
    2-core machine, several times slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_tools_train_two_steps_with_the_retriever(search_url, tmp_path, monkeypatch, one_thread):
    """TSPOGRPOTrainer(..., tools=[search]) trains 2 steps with TRL's own tool loop; the tool asks
    tspo-fast's retrieval server.  FOLR's k* is the turn whose tool output (tool_mask = 0) first
    holds the gold answer, and K3 computed the loss on K2's per-turn advantages."""
    # docs/kernels.md, "Use the kernels elsewhere", TRL: its snippet up to the trainer, as written,
    # with the live server's URL for the default one; the trainer below is the snippet's call
    # with a CPU-sized GRPOConfig.
    head = docs_snippet("### TRL").split("trainer = ", 1)[0]
    ns: dict = {}
    exec(head.replace('"http://127.0.0.1:8000"', repr(search_url)), ns)
    search = ns["search"]
    assert "Doc 1(Title: Paris) Paris is the capital of France." in search("capital of France")
    folder = tool_calling_policy(str(tmp_path / "policy"), search)

    k3 = []
    real_k3 = tspo_kernels.fused_linear_pg_loss

    def k3_spy(*args, **kwargs):
        out = real_k3(*args, **kwargs)
        k3.append((args[4].detach().clone(), out))
        return out

    monkeypatch.setattr(tspo_kernels, "fused_linear_pg_loss", k3_spy)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "golden_answers": [gold]}
                              for q, _, gold, _ in TOOL_QA])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_generations=4,
                      max_completion_length=96, max_steps=2, learning_rate=1e-3, logging_steps=1, report_to="none",
                      save_strategy="no", use_cpu=True, bf16=False, seed=0, dataloader_num_workers=0,
                      disable_tqdm=True, loss_type="dapo", beta=0.001, use_bias_correction_kl=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    trainer = TSPOGRPOTrainer(model=model, train_dataset=data, processing_class=load_tokenizer(folder),
                              reward_funcs=[outcome_reward_func("em")], tools=[search], folr_alpha=0.5, args=args)
    seen = []
    real_adv, real_first = trainer._tspo_advantages, trainer._first_turns

    def first_spy(inputs, completion_ids, turns):
        k = real_first(inputs, completion_ids, turns)
        seen.append({"inputs": inputs, "k_star": k})
        return k

    def adv_spy(inputs, out):
        adv = real_adv(inputs, out)
        seen[-1].update(out=dict(out), adv=adv)
        return adv

    trainer._first_turns, trainer._tspo_advantages = first_spy, adv_spy
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()

    assert trainer.state.global_step == 2 and len(seen) == 2
    tok = trainer.processing_class
    searched = 0
    for batch in seen:
        out, k_star = batch["out"], batch["k_star"]
        assert "tool_mask" in out, "TRL's tool loop did not run (no tool_mask)"
        completion = out["completion_mask"].bool()
        action = completion & out["tool_mask"].bool()
        turns = turns_from_action_mask(action, completion)
        for i, x in enumerate(batch["inputs"]):
            gold = x["golden_answers"][0]
            ids = out["completion_ids"][i]
            want = -1
            for k in range(int(turns.num_turns[i])):          # the tool output of each turn, as text
                obs = tok.decode(ids[turns.is_obs[i] & (turns.turn_id[i] == k)])
                if not obs:
                    continue
                call = re.search(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", tok.decode(ids[action[i] & (turns.turn_id[i] == k)]), re.S)
                assert call is not None, f"row {i}: an observation without a tool call before it: {obs!r}"
                query = json.loads(call.group(1))["arguments"]["query"]
                assert "<tool_response>" in obs and search(query).strip() in obs      # it is the tool's output
                searched += 1
                if want < 0 and gold in obs:
                    want = k
            assert int(k_star[i]) == want, (i, int(k_star[i]), want, tok.decode(ids[completion[i]]))
        # K3 got K2's per-turn advantages on the policy's tokens (TRL may reorder rows)
        adv = batch["adv"]
        outcome = torch.tensor([outcome_reward(tok.decode(out["completion_ids"][i][completion[i]]), x["golden_answers"],
                                               "em") for i, x in enumerate(batch["inputs"])])
        want_adv, _ = reference.turn_advantages(outcome, k_star, turns.num_turns, torch.arange(len(k_star)) // 4,
                                                turns.turn_id, action)
        assert torch.allclose(adv, want_adv, atol=1e-5)
    assert searched > 0 and any(int((b["k_star"] >= 0).sum()) for b in seen), "no rollout searched and found the answer"
    assert len(k3) == 2, f"K3 ran {len(k3)} times for 2 steps"
    for (k3_adv, k3_out), batch in zip(k3, seen):
        action = batch["out"]["completion_mask"].bool() & batch["out"]["tool_mask"].bool()
        assert torch.equal(torch.sort(k3_adv).values, torch.sort(batch["adv"][action].float()).values)
        assert torch.isfinite(k3_out.loss)
    assert any(b["adv"].abs().sum() > 0 for b in seen), "every group was uniform: nothing to learn from"
    changed = sum(not torch.equal(before[n], p.detach()) for n, p in trainer.model.named_parameters())
    assert changed > 0
    logs = trainer.state.log_history
    assert logs[0]["tools/call_frequency"] > 0 and "tspo/folr_hit" in logs[0]
