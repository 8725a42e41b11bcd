"""Question-answering data: Search-R1 / FlashRAG files, the bundled sets, prompt items (docs/algorithm.md §6).

The prompt text itself is the protocol's (:mod:`tspo_fast.protocol`, docs/algorithm.md §1).
"""
from .files import load_split, resolve_data_file
from .prompts import PromptItem, drop_long_prompts, prompt_items
from .qa import (
    DataError,
    QAExample,
    convert_file,
    detect_layout,
    examples_from_rows,
    load_examples,
    read_rows,
    to_flashrag_row,
    to_searchr1_row,
    write_rows,
)

__all__ = ["DataError", "PromptItem", "QAExample", "convert_file", "detect_layout", "drop_long_prompts",
           "examples_from_rows", "load_examples", "load_split", "prompt_items", "read_rows", "resolve_data_file",
           "to_flashrag_row", "to_searchr1_row", "write_rows"]
