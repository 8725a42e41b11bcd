"""Extensions named in a config alone: a ``package.module:attribute`` path as ``advantage.mode``,
``retrieval.kind`` or ``rollout.engine`` is imported and checked when the config loads, and the
``options`` mapping beside it reaches the plugin.  The plugins live in files outside the package
(written here into tmp_path); the last test trains with all three from a YAML file, through the
``tspo-fast train`` command in a fresh process."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from tspo_fast.config import ConfigError, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ESTIMATOR = '''
"""A plugin estimator: GRPO's advantages times advantage.options.scale (records each call)."""
import dataclasses
import json

from tspo_fast.algo.advantages import ESTIMATORS


def scaled_grpo(batch, outcome, first_turn, settings):
    grpo = ESTIMATORS.get("grpo")
    token_adv, turn_adv = grpo(batch, outcome, first_turn, dataclasses.replace(settings, mode="grpo", options={}))
    scale = float(settings.options["scale"])
    trained = batch.loss_mask
    with open(settings.options["record"], "a") as f:
        f.write(json.dumps({"options": dict(settings.options), "seed": settings.seed, "alpha": settings.alpha,
                            "max_turns": settings.max_turns, "norm": settings.norm,
                            "unscaled": float(token_adv[trained].abs().mean()),
                            "scaled": float((token_adv * scale)[trained].abs().mean())}) + "\\n")
    return token_adv * scale, turn_adv * scale
'''

RETRIEVER = '''
"""A plugin retriever: the bundled in-process BM25 index, named by its class (from_config)."""
import json

from tspo_fast.retrieval.bundled import resolve_index
from tspo_fast.retrieval.inprocess import InProcessRetriever


class LoggedBM25:
    def __init__(self, inner, record):
        self.inner, self.record = inner, record

    @classmethod
    def from_config(cls, cfg):
        with open(cfg.options["record"], "a") as f:
            f.write(json.dumps({"built": dict(cfg.options), "topk": cfg.topk}) + "\\n")
        return cls(InProcessRetriever.from_dir(resolve_index(cfg.index)), cfg.options["record"])

    def retrieve(self, queries, topk):
        with open(self.record, "a") as f:
            f.write(json.dumps({"queries": len(queries), "topk": topk}) + "\\n")
        return self.inner.retrieve(queries, topk)
'''

ENGINE = '''
"""A plugin engine: the real Hugging Face engine, counting the prompts it is asked to continue."""
import json

from tspo_fast.engines import hf


class CountingEngine:
    def __init__(self, inner, record):
        self.inner, self.record = inner, record

    def generate(self, prompts, sampling, keys=None):
        with open(self.record, "a") as f:
            f.write(json.dumps({"prompts": len(prompts)}) + "\\n")
        return self.inner.generate(prompts, sampling, keys=keys)

    def __getattr__(self, name):          # load_weights, weight_names, max_model_len, dtype, ...
        return getattr(self.inner, name)


def from_config(settings):
    with open(settings.options["record"], "a") as f:
        f.write(json.dumps({"built": dict(settings.options), "rank": settings.rank, "world": settings.world,
                            "max_model_len": settings.max_model_len}) + "\\n")
    return CountingEngine(hf.from_config(settings), settings.options["record"])
'''

NOT_PLUGINS = '''
LIMIT = 3


def two_args(a, b):
    return a, b
'''


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    """A folder outside the package with the three plugins (and a module of things that are not),
    importable in this process and in the subprocesses given its path on PYTHONPATH."""
    folder = tmp_path / "plugins"
    folder.mkdir()
    for name, text in (("my_estimator", ESTIMATOR), ("my_retriever", RETRIEVER), ("my_engine", ENGINE),
                       ("not_plugins", NOT_PLUGINS), ("broken_plugin", "LIMIT = 1 / 0\n"),
                       ("needs_missing", "import no_such_dependency_xyz\n")):
        (folder / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_plugin_paths_are_valid_config_values(plugins):
    cfg = load_config(None, ["advantage.mode=my_estimator:scaled_grpo", "advantage.options={scale: 0.5, x: [1, 2]}",
                             "retrieval.kind=my_retriever:LoggedBM25", "retrieval.options.record=r.jsonl",
                             "rollout.engine=my_engine:from_config", "rollout.options.record=e.jsonl"])
    assert cfg.advantage.options == {"scale": 0.5, "x": [1, 2]}        # a plugin's options are its own
    assert (cfg.retrieval.kind, cfg.rollout.options) == ("my_retriever:LoggedBM25", {"record": "e.jsonl"})


@pytest.mark.parametrize("override,message", [
    ("advantage.mode=no_such_pkg.rules:fn",
     r"^advantage.mode: cannot import module 'no_such_pkg.rules' of 'no_such_pkg.rules:fn' \(ModuleNotFoundError"),
    ("advantage.mode=broken_plugin:fn", r"^advantage.mode: importing module 'broken_plugin' of 'broken_plugin:fn' "
                                        r"failed \(ZeroDivisionError: division by zero\)"),
    ("advantage.mode=needs_missing:fn", r"^advantage.mode: cannot import module 'needs_missing' of 'needs_missing:fn' "
                                        r"\(ModuleNotFoundError: No module named 'no_such_dependency_xyz'\)$"),
    ("advantage.mode=my_estimator:nope", r"^advantage.mode: 'my_estimator' has no attribute 'nope'"),
    ("retrieval.kind=my_retriever:LoggedBM25.nope", r"^retrieval.kind: 'my_retriever:LoggedBM25' has no attribute"),
    ("rollout.engine=not_plugins:LIMIT", r"^rollout.engine: 'not_plugins:LIMIT' is of type int, not callable as "
                                         r"factory\(settings\)"),
    ("advantage.mode=not_plugins:two_args", r"^advantage.mode: 'not_plugins:two_args' has the signature \(a, b\), "
                                            r"which cannot be called as estimator\(batch, outcome, first_turn, "
                                            r"settings\)"),
    ("rollout.engine=my_engine:", r"^rollout.engine: expected a string"),          # YAML reads "x:" as a mapping
    ("retrieval.kind=:from_config", r"^retrieval.kind: ':from_config' is not a 'package.module:attribute' path"),
    ("advantage.mode=toy", r"^advantage.mode: must be one of 'tspo', 'grpo', 'tspo_stage', 'tspo_placebo' or a "
                           r"'package.module:attribute' path, got 'toy'"),
    ("advantage.options.scale=2", r"^advantage.options: unknown option\(s\) 'scale' for advantage.mode 'tspo_stage', "
                                  r"which takes no options"),
    ("rollout.options.batch_size=2", r"^rollout.options: unknown option\(s\) 'batch_size' for rollout.engine 'hf'"),
    ("retrieval.options=[1, 2]", r"^retrieval.options: expected a mapping, got list"),
    ("advantage.options={1: a}", r"^advantage.options: keys must be strings, got 1"),
])
def test_bad_extensions_name_the_field_at_load(plugins, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["rollout.engine=hf", override])


def test_an_empty_options_entry_is_no_options(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("advantage:\n  mode: grpo\n  options:\n")
    assert load_config(str(path)).advantage.options == {}


def _records(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_plugins_from_yaml_alone_train(train_env, plugins, tmp_path):
    """``tspo-fast train --config plugins.yaml``: estimator, retriever and engine are plugins named
    by path, each with its options; no wrapper script, no registration."""
    out, rec = tmp_path / "run", {k: str(tmp_path / f"{k}.jsonl") for k in ("estimator", "retriever", "engine")}
    with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
        tree = yaml.safe_load(f)
    tree["output_dir"] = str(out)
    tree["advantage"] = {"mode": "my_estimator:scaled_grpo", "norm": "group",
                         "options": {"scale": 0.5, "record": rec["estimator"]}}
    tree["retrieval"].update(kind="my_retriever:LoggedBM25", options={"record": rec["retriever"], "note": "bm25"})
    tree["rollout"].update(engine="my_engine:from_config", options={"record": rec["engine"]}, n=2,
                           max_new_tokens_per_turn=24, max_turns=2, max_response_tokens=160)
    tree["train"].update(total_steps=1, prompts_per_step=2, mini_batch_prompts=2, eval_every=0, checkpoint_every=0)
    tree["loss"]["chunk_size"] = 64
    config = tmp_path / "plugins.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    env = dict(train_env, PYTHONPATH=os.pathsep.join([train_env["PYTHONPATH"], str(plugins)]))
    p = subprocess.run([sys.executable, "-m", "tspo_fast.cli", "train", "--config", str(config), "--no-plot"],
                       cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    with open(out / "metrics.jsonl") as f:
        (row,) = [json.loads(line) for line in f]
    est, ret, eng = _records(rec["estimator"]), _records(rec["retriever"]), _records(rec["engine"])
    # the estimator: called once, with its options and the step's settings; its advantages were trained on
    assert len(est) == 1 and est[0]["options"] == {"scale": 0.5, "record": rec["estimator"]}
    assert (est[0]["alpha"], est[0]["max_turns"], est[0]["norm"]) == (tree["reward"]["folr_alpha"], 3, "group")
    assert est[0]["scaled"] == pytest.approx(0.5 * est[0]["unscaled"])
    assert row["advantage/token_abs_mean"] == pytest.approx(est[0]["scaled"], rel=1e-5)
    # the retriever: built once with its options; every search of the step went through it
    assert ret[0] == {"built": {"record": rec["retriever"], "note": "bm25"}, "topk": 3}
    searches = sum(r["queries"] for r in ret[1:])
    assert searches == round(row["rollout/searches"] * 4) and all(r["topk"] == 3 for r in ret[1:])
    # the engine: built once on rank 0 of 1 with its options; it generated every turn (4 rollouts)
    assert eng[0] == {"built": {"record": rec["engine"]}, "rank": 0, "world": 1, "max_model_len": 512 + 160}
    assert eng[1]["prompts"] == 4 and sum(r["prompts"] for r in eng[1:]) >= 4
    saved = yaml.safe_load((out / "config.yaml").read_text())          # the run's record names the plugins
    assert saved["rollout"]["engine"] == "my_engine:from_config" and saved["advantage"]["options"]["scale"] == 0.5
