"""Data loading (Search-R1 and FlashRAG layouts), conversion, prompts, and the bundled world."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tspo_fast.data import DataError, QAExample, convert_file, load_examples, read_rows, to_searchr1_row, write_rows
from tspo_fast.protocol import PROMPT_TEMPLATE, build_prompt, prompt_text
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
    (lambda r: r.update(extra_info="split=train"), "field 'extra_info' must be an object (a mapping), got str"),
    (lambda r: r["extra_info"].update(index="x2"), "field 'extra_info.index' must be an integer, got str 'x2'"),
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
    ({"id": "1", "question": "q?", "golden_answers": ["a"], "metadata": {"index": "seven"}},
     "field 'metadata.index' must be an integer, got str 'seven'"),
    ({"id": "1", "question": "q?", "golden_answers": ["a"], "metadata": {"index": 2.5}},
     "field 'metadata.index' must be an integer, got float 2.5"),
    ({"id": "1", "question": "q?", "golden_answers": ["a"], "metadata": "hops=2"},
     "field 'metadata' must be an object (a mapping), got str 'hops=2'"),
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
    from tspo_fast.worldgen.generate import generate

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


# ---------------------------------------------------------------------------- rows that lie


@pytest.mark.parametrize("row, message", [
    ({"id": "1", "question": {"text": "hi"}, "golden_answers": ["a"]}, "field 'question' must be a string, got dict"),
    ({"id": "1", "question": 42, "golden_answers": ["a"]}, "field 'question' must be a string, got int"),
    ({"id": "1", "question": " ? ", "golden_answers": ["a"]}, "empty question"),
    ({"id": "1", "question": "   ", "golden_answers": ["a"]}, "empty question"),
    ({"id": "1", "question": "q?", "golden_answers": {"a": 1}},
     "field 'golden_answers' must be a string or a list of strings, got dict"),
    ({"id": "1", "question": "q?", "golden_answers": ["a", 3]}, "field 'golden_answers[1]' must be a string, got int"),
    ({"id": "1", "question": "q?", "golden_answers": ["a", "  "]}, "field 'golden_answers[1]' is empty"),
    ({"id": "1", "question": "q?", "golden_answers": ["a"], "data_source": ["x"]},
     "field 'data_source' must be a string, got list"),
])
def test_bad_rows_are_rejected_naming_file_row_and_field(tmp_path, row, message):
    path = tmp_path / "nq.jsonl"
    path.write_text(json.dumps({"id": "0", "question": "ok?", "golden_answers": ["a"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError) as err:
        load_examples(path)
    assert str(path) in str(err.value) and "row 1" in str(err.value) and message in str(err.value), str(err.value)


def test_searchr1_question_from_prompt_is_checked_too(tmp_path):
    row = _searchr1_row(0, "q?", ["a"])
    del row["question"], row["golden_answers"]
    row["prompt"][0]["content"] = PROMPT_TEMPLATE.format(question=" ? ")
    with pytest.raises(DataError, match=r"row 0: empty question \(field 'prompt'"):
        load_examples(_write_jsonl(tmp_path / "sr1.jsonl", [row]))


def test_non_utf8_bytes_name_the_file_and_row(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"id": "0", "question": "ok?", "golden_answers": ["a"]}\n\n'
                     b'{"id": "1", "question": "caf\xe9?", "golden_answers": ["b"]}\n')
    with pytest.raises(DataError, match=r"latin1\.jsonl: row 1 \(line 3\): not valid UTF-8 \(byte 0xe9"):
        load_examples(path)
    rows = [{"id": str(i), "question": "q?", "golden_answers": ["a"]} for i in range(3)]
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.Table.from_pylist(rows, schema=pa.schema([("id", pa.string()), ("question", pa.binary()),
                                                         ("golden_answers", pa.list_(pa.string()))]))
    table = table.set_column(1, "question", pa.array([b"q?", b"q?", b"caf\xe9?"]).cast(pa.binary()))
    # a string column holding invalid UTF-8 (parquet does not validate it on write)
    pq.write_table(table.cast(pa.schema([("id", pa.string()), ("question", pa.string()),
                                         ("golden_answers", pa.list_(pa.string()))]), safe=False), tmp_path / "b.parquet")
    with pytest.raises(DataError, match=r"b\.parquet: row 2: not valid UTF-8"):
        load_examples(tmp_path / "b.parquet")


def test_files_listed_twice_and_duplicate_uids_across_files(tmp_path):
    from tspo_fast.data import load_split

    a = _write_jsonl(tmp_path / "nq.jsonl", [{"id": str(i), "question": f"q{i}?", "golden_answers": ["a"]}
                                             for i in range(3)])
    copy = tmp_path / "nq_copy.jsonl"
    copy.write_bytes(a.read_bytes())
    with pytest.raises(DataError, match=r"nq_copy\.jsonl: the same file \(same contents\) as .*nq\.jsonl"):
        load_split([str(a), str(copy)])
    d = tmp_path / "other"
    d.mkdir()
    b = _write_jsonl(d / "nq.jsonl", [{"id": "9", "question": "x?", "golden_answers": ["b"]},
                                      {"id": "1", "question": "y?", "golden_answers": ["b"]}])
    with pytest.raises(DataError, match=r"other/nq\.jsonl: row 1: duplicate uid 'nq/1' \(also in .*nq\.jsonl\)"):
        load_split([str(a), str(b)])
    assert len(load_split([str(a)])) == 3


def test_over_long_prompts_are_skipped_with_a_count_or_rejected():
    from tspo_fast.data import drop_long_prompts, prompt_items
    from tspo_fast.models import load_tokenizer
    from tspo_fast.world import WARM_POLICY_DIR

    tok = load_tokenizer(str(WARM_POLICY_DIR))
    exs = load_examples(qa_path("test"))[:6]
    long = dataclasses.replace(exs[2], question="Where " + "is it really " * 200 + "?")
    exs[2] = long
    limit = max(len(i.prompt_ids) for i in prompt_items(exs[:2], tok)) + 5
    kept, report = drop_long_prompts(exs, tok, "auto", limit, what="training")
    assert kept == exs[:2] + exs[3:]
    assert report.startswith("skipped 1 of 6 training question(s) have a prompt longer than "
                             f"data.max_prompt_tokens={limit} tokens (first: uid {long.uid!r}")
    assert drop_long_prompts(exs[:2], tok, "auto", limit) == (exs[:2], "")
    with pytest.raises(DataError, match=f"uid {long.uid!r}.*raise data.max_prompt_tokens, or set data.overlong_prompts: skip"):
        drop_long_prompts(exs, tok, "auto", limit, policy="error")
    with pytest.raises(DataError, match="6 of 6"):
        drop_long_prompts(exs, tok, "auto", 8)


def test_integer_indexes_in_other_spellings_still_load(tmp_path):
    path = _write_jsonl(tmp_path / "nq.jsonl", [
        {"id": "0", "question": "a?", "golden_answers": ["a"], "metadata": {"index": "12"}},
        {"id": "1", "question": "b?", "golden_answers": ["b"], "metadata": {"index": 13.0}},
        {"id": "2", "question": "c?", "golden_answers": ["c"], "metadata": None}])
    assert [ex.index for ex in load_examples(path)] == [12, 13, 2]


@pytest.mark.parametrize("text", ["", "\n\n"])
def test_an_empty_data_file_in_a_config_is_an_error_naming_it(tmp_path, text):
    from tspo_fast.data import load_split

    empty = tmp_path / "train.jsonl"
    empty.write_text(text)
    with pytest.raises(DataError, match=rf"^{empty}: the data file has no questions"):
        load_split([str(empty)])
