"""Data loading (Search-R1 and FlashRAG layouts), conversion, prompts, and the bundled world."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tspo_fast.data import (PROMPT_TEMPLATE, DataError, QAExample, build_prompt, convert_file,
                            load_examples, prompt_text, read_rows, to_searchr1_row, write_rows)
from tspo_fast.world import corpus_path, qa_path

EXPECTED_PROMPT = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first "
    "every time you get new information. After reasoning, if you find you lack some knowledge, "
    "you can call a search engine by <search> query </search> and it will return the top "
    "searched results between <information> and </information>. You can search as many times "
    "as your want. If you find no further external knowledge needed, you can directly provide "
    "the answer inside <answer> and </answer>, without detailed illustrations. For example, "
    "<answer> Beijing </answer>. Question: {q}\n"
)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _searchr1_row(i: int, question: str, answers: list[str], source: str = "nq") -> dict:
    return {"id": f"train_{i}", "question": question, "golden_answers": answers,
            "data_source": source,
            "prompt": [{"role": "user", "content": PROMPT_TEMPLATE.format(question=question)}],
            "ability": "fact-reasoning",
            "reward_model": {"style": "rule", "ground_truth": {"target": answers}},
            "extra_info": {"split": "train", "index": i}}


# ---------------------------------------------------------------------------- prompts


def test_prompt_text_exact():
    assert prompt_text("  who wrote hamlet ") == EXPECTED_PROMPT.format(q="who wrote hamlet?")
    assert prompt_text("Who wrote Hamlet?") == EXPECTED_PROMPT.format(q="Who wrote Hamlet?")
    assert build_prompt("who wrote hamlet") == EXPECTED_PROMPT.format(q="who wrote hamlet?")


class _TemplateTokenizer:
    """The two attributes ``build_prompt`` uses of a Hugging Face tokenizer."""

    chat_template = "{role}: {content}"

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return "<user>" + messages[0]["content"] + "<assistant>"


def test_prompt_with_and_without_chat_template():
    tok = _TemplateTokenizer()
    text = build_prompt("Where is Velmora", tok)
    raw = EXPECTED_PROMPT.format(q="Where is Velmora?")
    assert text == "<user>" + raw + "<assistant>"
    assert tok.calls == [([{"role": "user", "content": raw}], False, True)]
    tok.chat_template = None  # a tokenizer without a template: raw prompt
    assert build_prompt("Where is Velmora", tok) == raw


def test_prompt_with_real_tokenizer_chat_template(tmp_path):
    """A real transformers tokenizer with a chat template (built offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    raw_tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw_tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw_tok, unk_token="[UNK]")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                         "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
                         "assistant\n{% endif %}")
    out = build_prompt("capital of Dondesh", tok)
    assert out == ("<|im_start|>user\n" + EXPECTED_PROMPT.format(q="capital of Dondesh?")
                   + "<|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------- loading


def test_load_searchr1_jsonl_and_parquet(tmp_path):
    rows = [_searchr1_row(0, "who wrote hamlet?", ["Shakespeare", "William Shakespeare"]),
            _searchr1_row(1, "capital of france", ["Paris"], source="hotpotqa")]
    # a Search-R1 file without the original question column: the question comes from the prompt
    del rows[1]["question"], rows[1]["golden_answers"]
    for path in (_write_jsonl(tmp_path / "a.jsonl", rows), write_rows(rows, tmp_path / "a.parquet")):
        exs = load_examples(path)
        assert [e.uid for e in exs] == ["nq/train_0", "hotpotqa/train_1"]
        assert exs[0].aliases == ("Shakespeare", "William Shakespeare")
        assert exs[0].question == "who wrote hamlet?"
        assert exs[1].question == "capital of france?"
        assert exs[1].aliases == ("Paris",) and exs[1].index == 1 and exs[1].split == "train"
        assert exs[1].prompt() == EXPECTED_PROMPT.format(q="capital of france?")


def test_load_flashrag_jsonl(tmp_path):
    d = tmp_path / "popqa"
    d.mkdir()
    path = _write_jsonl(d / "test.jsonl", [
        {"id": "test_0", "question": "What is Aldo's occupation", "golden_answers": ["painter"]},
        {"id": "test_1", "question": "Who founded X?", "golden_answers": ["Y", "Mr. Y"]}])
    exs = load_examples(path)
    assert [e.data_source for e in exs] == ["popqa", "popqa"]  # from the folder name
    assert exs[0].question == "What is Aldo's occupation?"
    assert exs[1].aliases == ("Y", "Mr. Y") and exs[1].uid == "popqa/test_1"
    assert load_examples(path, data_source="pq")[0].uid == "pq/test_0"


def test_converter_round_trips(tmp_path):
    src = _write_jsonl(tmp_path / "sr1.jsonl",
                       [_searchr1_row(i, f"question {i}?", [f"a{i}", f"A{i}"]) for i in range(5)])
    original = load_examples(src)
    convert_file(src, tmp_path / "flash.jsonl", to="flashrag")
    flash = load_examples(tmp_path / "flash.jsonl")
    assert flash == original
    convert_file(tmp_path / "flash.jsonl", tmp_path / "back.parquet", to="searchr1")
    assert load_examples(tmp_path / "back.parquet") == original
    assert read_rows(tmp_path / "back.parquet") == read_rows(src)

    fr = _write_jsonl(tmp_path / "fr.jsonl", [{"id": str(i), "question": f"q{i}?",
                                               "golden_answers": [f"x{i}"]} for i in range(3)])
    convert_file(fr, tmp_path / "fr_sr1.jsonl", to="searchr1", data_source="nq", split="test")
    convert_file(tmp_path / "fr_sr1.jsonl", tmp_path / "fr_back.jsonl", to="flashrag")
    expected = [dataclasses.replace(e, split="test") for e in load_examples(fr, data_source="nq")]
    assert load_examples(tmp_path / "fr_back.jsonl") == expected


# ---------------------------------------------------------------------------- errors


def test_missing_file_names_path(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl"):
        load_examples(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r["reward_model"]["ground_truth"].update(target=[]), "empty alias list"),
    (lambda r: r.pop("reward_model"), "missing field 'reward_model.ground_truth.target'"),
    (lambda r: r["extra_info"].pop("index"), "missing field 'extra_info.index'"),
    (lambda r: (r.pop("prompt"), r.pop("question")), "missing field 'prompt'"),
])
def test_searchr1_errors_name_file_and_row(tmp_path, mutate, message):
    rows = [_searchr1_row(i, f"q{i}?", ["a"]) for i in range(3)]
    for r in rows:
        del r["golden_answers"]
    mutate(rows[2])
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(path) in str(err.value) and "row 2" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("row, message", [
    ({"id": "1", "question": "q?", "golden_answers": []}, "'golden_answers' is an empty alias list"),
    ({"id": "1", "question": "q?"}, "missing field 'golden_answers'"),
    ({"id": "1", "golden_answers": ["a"]}, "missing field 'question'"),
])
def test_flashrag_errors_name_file_and_row(tmp_path, row, message):
    path = _write_jsonl(tmp_path / "nq.jsonl",
                        [{"id": "0", "question": "ok?", "golden_answers": ["a"]}, row])
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(path) in str(err.value) and "row 1" in str(err.value) and message in str(err.value)


def test_unparseable_jsonl_names_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"question": "a?", "golden_answers": ["x"]}\n{"question": oops}\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load_examples(path)


# ---------------------------------------------------------------------------- the bundled world


def test_world_files_equal_a_fresh_generation(tmp_path):
    from tspo_fast.world.generate import generate

    fresh = generate(tmp_path)
    for name, path in fresh.items():
        shipped = corpus_path() if name == "corpus" else qa_path(name)
        assert shipped.read_bytes() == path.read_bytes(), f"{shipped} differs from a fresh run"
    total = sum(p.stat().st_size for p in fresh.values())
    assert total < 2_000_000, f"world files are {total} bytes"


def test_world_contents_are_consistent():
    corpus = [json.loads(line) for line in corpus_path().read_text().splitlines()]
    ids = {d["id"]: d["contents"] for d in corpus}
    assert len(ids) == len(corpus) and 300 <= len(corpus) <= 2000
    assert all(c.startswith('"') and '"\n' in c for c in ids.values())
    for split, n in (("train", 1000), ("test", 300)):
        exs = load_examples(qa_path(split))
        assert len(exs) == n
        assert {e.data_source for e in exs} == {"world_1hop", "world_2hop"}
        for e in exs:
            assert e.extra["hops"] == len(e.extra["support"]) == (1 if e.data_source == "world_1hop" else 2)
            last = ids[e.extra["support"][-1]].lower()
            # the last support passage holds an alias of the answer (or the first, for the
            # "which river flows through" questions, where the city passage names it)
            assert any(a.lower() in last for a in e.aliases), (e, last)
    # no test question is also a training question
    test_q = {e.question for e in load_examples(qa_path("test"))}
    assert not test_q & {e.question for e in load_examples(qa_path("train"))}


def test_qaexample_is_hashable_and_prompt_builds():
    ex = QAExample(uid="nq/1", question="who?", aliases=("x",), data_source="nq")
    assert hash(ex) == hash(QAExample(uid="nq/1", question="who?", aliases=("x",), data_source="nq"))
    assert to_searchr1_row(ex)["prompt"][0]["content"] == EXPECTED_PROMPT.format(q="who?")
