"""Question-answering data: Search-R1 / FlashRAG files, the bundled sets, prompts (docs/algorithm.md §1, §6)."""
from .files import load_split, resolve_data_file
from .prompts import PromptItem, drop_long_prompts, prompt_items
from .qa import (
                 PROMPT_TEMPLATE,
                 DataError,
                 QAExample,
                 build_prompt,
                 convert_file,
                 detect_layout,
                 examples_from_rows,
                 load_examples,
                 normalize_question,
                 prompt_text,
                 question_from_prompt,
                 read_rows,
                 to_flashrag_row,
                 to_searchr1_row,
                 write_rows,
)

__all__ = ["PROMPT_TEMPLATE", "DataError", "PromptItem", "QAExample", "build_prompt", "convert_file",
           "detect_layout", "drop_long_prompts", "examples_from_rows", "load_examples", "load_split", "normalize_question",
           "prompt_items", "prompt_text", "question_from_prompt", "read_rows", "resolve_data_file",
           "to_flashrag_row", "to_searchr1_row", "write_rows"]
