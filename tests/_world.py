"""Shared test helper: indexes of the bundled world, built once per test session."""
from tspo_fast.retrieval.index import build_index
from tspo_fast.world import corpus_path


def world_index_dir(tmp_path_factory, kind: str):
    """Build (once per session) an index of the bundled corpus; shared by the test files."""
    root = tmp_path_factory.getbasetemp() / f"world_index_{kind}"
    if not (root / "meta.json").is_file():
        build_index(corpus_path(), kind, root, progress=False)
    return root
