"""The documentation stays a true map of the code: README.md is short and keeps the two commands
CI runs; every link of README.md and docs/*.md reaches an existing file (and heading); every
repository path, ``tspo-fast`` subcommand, ``python -m`` module and config field the pages name
exists; every config field is documented where its dataclass defines it.  Text checks only (no
training, no heavy imports): the checks take well under a second."""
from __future__ import annotations

import ast
import functools
import glob
import io
import re
import tokenize
from pathlib import Path

import pytest

from tspo_fast.cli import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CONFIG = ROOT / "tspo_fast" / "config.py"
MAX_README_LINES = 250

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")
REPO_PATH = re.compile(r"(?<![\w/.-])((?:tspo_fast|tspo_kernels|bench|tests|configs|scripts|docs|\.ci)/[\w./*-]*)")


def _ids(pages):
    return [str(p.relative_to(ROOT)) for p in pages]


def _prose(text: str) -> str:
    """The page without its fenced code blocks (their lines stay, blank, so line numbers hold)."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set:
    seen: dict = {}
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _prose(page.read_text(encoding="utf-8")), re.M):
        s = slug(m.group(1))
        seen[s] = seen.get(s, -1) + 1
        if seen[s]:
            s = f"{s}-{seen[s]}"
            seen[s] = 0
    return set(seen)


def test_readme_is_a_map():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md: {lines} lines, more than {MAX_README_LINES}; move detail to docs/"
    text = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"(docs/{page.name}" in text, f"README.md: no link to docs/{page.name}"


def _ci_command() -> str:
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()]
    body = [ln for ln in lines if ln and not ln.startswith(("#", "set ", "cd "))]
    assert len(body) == 1, f".ci/run: expected one command, found {body}"
    return body[0]


def test_readme_two_commands_are_what_ci_runs():
    text = README.read_text(encoding="utf-8")
    block = re.compile(r"```bash\n(.*?)```", re.S).search(text, text.index("## Two commands"))
    assert block is not None, "README.md: no bash block under '## Two commands'"
    commands = [ln.split("#", 1)[0].strip() for ln in block.group(1).splitlines() if ln.strip()]
    assert commands == ["bash scripts/install.sh cpu && tspo-fast train --config configs/tiny.yaml",
                        _ci_command()], f"README.md, Two commands: {commands}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_links_reach_files_and_headings(page):
    bad = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):                       # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if ROOT in dest.parents else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: broken link(s): " + "; ".join(bad)


def _defines(path: Path, name: str) -> bool:
    return re.search(rf"^\s*(def|class) {name}\b|^{name}\b.*=", path.read_text(encoding="utf-8"), re.M) is not None


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_paths_exist(page):
    text = page.read_text(encoding="utf-8")
    bad = []
    for raw in REPO_PATH.findall(text):
        path = raw.rstrip(".,:;)").split("::")[0]
        if "<" in path or not glob.glob(str(ROOT / path)):
            bad.append(path)
    for span in SPAN.findall(text):                              # `tspo_fast/protocol.py: build_prompt`
        m = re.fullmatch(r"(\S+\.py): (\w+)", span)
        if m and not ((ROOT / m.group(1)).exists() and _defines(ROOT / m.group(1), m.group(2))):
            bad.append(span)
    assert not bad, f"{page.relative_to(ROOT)}: named but missing: {sorted(set(bad))}"


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_commands_and_modules_exist(page):
    text = page.read_text(encoding="utf-8")
    code = "\n".join(FENCE.findall(text) + SPAN.findall(_prose(text)))      # commands are written as code
    bad = [f"tspo-fast {c}" for c in re.findall(r"tspo-fast ([a-z]+)\b", code) if c not in COMMANDS]
    for module in re.findall(r"python -m (tspo_fast[\w.]*)", text):
        base = ROOT / module.replace(".", "/")
        if not (base.with_suffix(".py").exists() or (base / "__main__.py").exists()):
            bad.append(f"python -m {module}")
    assert not bad, f"{page.relative_to(ROOT)}: no such command or module: {bad}"


# ----------------------------------------------------------------------------- config fields
@functools.lru_cache(maxsize=None)
def _dataclasses():
    """{class name: (docstring, [(field, annotation, first line, last line)])} of config.py."""
    tree = ast.parse(CONFIG.read_text(encoding="utf-8"))
    out = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(ast.unparse(d) == "dataclass" for d in node.decorator_list):
            fields = [(s.target.id, ast.unparse(s.annotation), s.lineno, s.end_lineno)
                      for s in node.body if isinstance(s, ast.AnnAssign)]
            out[node.name] = (ast.get_docstring(node), fields)
    return out


def _comment_lines():
    """(lines holding a comment, lines that are only a comment) of config.py."""
    tokens = list(tokenize.generate_tokens(io.StringIO(CONFIG.read_text(encoding="utf-8")).readline))
    code = {t.start[0] for t in tokens if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE,
                                                          tokenize.INDENT, tokenize.DEDENT)}
    comments = {t.start[0] for t in tokens if t.type == tokenize.COMMENT}
    return comments, comments - code


def test_every_config_field_is_documented_where_it_is_defined():
    classes = _dataclasses()
    assert "Config" in classes, "tspo_fast/config.py: no Config dataclass"
    comments, comment_only = _comment_lines()
    bad = []
    for cls, (_, fields) in classes.items():
        for name, annotation, first, last in fields:
            section = classes.get(annotation)
            if section is not None and section[0]:               # a section: its class docstring
                continue
            if not (comments & set(range(first, last + 1)) or first - 1 in comment_only):
                bad.append(f"{cls}.{name}")
    assert not bad, ("tspo_fast/config.py: field(s) without a comment beside or above their definition "
                     f"(meaning, unit, allowed values): {bad}")


def test_training_page_maps_every_config_section():
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    assert "tspo_fast/config.py" in text
    _, fields = _dataclasses()["Config"]
    missing = [name for name, *_ in fields if f"`{name}`" not in text]
    assert not missing, f"docs/training.md, Configs: section(s) not in its table: {missing}"


def _field_exists(parts) -> bool:
    classes = _dataclasses()
    cls = "Config"
    for i, part in enumerate(parts):
        names = {name: annotation for name, annotation, *_ in classes[cls][1]}
        if part.endswith("*"):
            return any(n.startswith(part[:-1]) for n in names)
        if part not in names:
            return False
        if names[part] not in classes:
            return i == len(parts) - 1
        cls = names[part]
    return True


FIELD_REF = re.compile(r"(?<![\w/.-])(model|data|retrieval|rollout|reward|advantage|loss|train|logging)"
                       r"((?:\.[a-z_0-9]+\*?|\.\*)+)")


@pytest.mark.parametrize("page", PAGES, ids=_ids(PAGES))
def test_named_config_fields_exist(page):
    bad = []
    for span in SPAN.findall(page.read_text(encoding="utf-8")):
        for section, rest in FIELD_REF.findall(span):
            parts = [section, *rest.lstrip(".").split(".")]
            if parts[-1] in ("py", "yaml", "md", "json", "jsonl", "png"):
                continue
            if not _field_exists(parts):
                bad.append(".".join(parts))
    assert not bad, f"{page.relative_to(ROOT)}: no such config field(s): {sorted(set(bad))}"
