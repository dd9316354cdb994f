"""Reading the user's files, fixing the label map, and tokenizing exactly as the model's own tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import minilm_path, movie_reviews_path
from edge_runtime.data import (
    Columns,
    DataError,
    LabelMap,
    holdout_split,
    infer_label_map,
    read_table,
    table_texts,
    write_rows,
)
from edge_runtime.tokenizer import EdgeTokenizer


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_tsv_and_jsonl_give_the_same_data(tmp_path):
    rows = [("a fine film", "it was fine", "pos"), ('a "so-so", film', "meh", "neg"), ("bad", "awful", "neg")]
    csv_path = _write(tmp_path, "d.csv", "sentence,other,label\n" + "".join(
        f'"{a.replace(chr(34), chr(34) * 2)}",{b},{c}\n' for a, b, c in rows))
    tsv_path = _write(tmp_path, "d.tsv", "sentence\tother\tlabel\r\n" + "".join(f"{a}\t{b}\t{c}\r\n" for a, b, c in rows))
    jsonl_path = _write(tmp_path, "d.jsonl", "".join(
        json.dumps({"sentence": a, "other": b, "label": c}) + "\n\n" for a, b, c in rows))
    columns = Columns(text="sentence", pair="other", label="label")
    results = []
    for path in (csv_path, tsv_path, jsonl_path):
        table = read_table(path)
        label_map = infer_label_map(table, column="label", num_labels=2)
        results.append(table_texts(table, columns, label_map))
        assert label_map == LabelMap("classification", ("neg", "pos"))
    for data in results:
        assert data.texts == [a for a, _, _ in rows]
        assert data.pairs == [b for _, b, _ in rows]
        assert data.labels.tolist() == [1, 0, 0] and data.labels.dtype == np.int64


def test_an_unknown_suffix_is_sniffed(tmp_path):
    assert read_table(_write(tmp_path, "a.txt", "text\tlabel\nhi\t1\n")).rows == [(2, {"text": "hi", "label": "1"})]
    assert read_table(_write(tmp_path, "b.txt", "text,label\nhi,1\n")).columns == ("text", "label")
    assert read_table(_write(tmp_path, "c.data", '{"text": "hi"}\n')).columns == ("text",)


def test_integer_labels_keep_their_value_and_other_labels_are_sorted(tmp_path):
    table = read_table(_write(tmp_path, "d.jsonl", '{"t": "x", "y": 1}\n{"t": "y", "y": 1.0}\n'))
    label_map = infer_label_map(table, column="y", num_labels=3)
    assert label_map.names == ("0", "1", "2")  # only 1 occurs, still id 1
    assert table_texts(table, Columns("t", label="y"), label_map).labels.tolist() == [1, 1]
    signed = read_table(_write(tmp_path, "s.csv", "t,y\na,1\nb,-1\nc,1\n"))
    assert infer_label_map(signed, column="y", num_labels=2).names == ("-1", "1")
    named = infer_label_map(signed, column="y", num_labels=2, names=["1", "-1"])
    assert table_texts(signed, Columns("t", label="y"), named).labels.tolist() == [0, 1, 0]


def test_threshold_and_regression_labels(tmp_path):
    table = read_table(_write(tmp_path, "d.tsv", "id\tscore\ttext\n1\t2.5\tgood\n2\t0\tmeh\n3\t-1e-3\tbad\n"))
    binary = infer_label_map(table, column="score", num_labels=2, threshold=0.0)
    assert table_texts(table, Columns("text", label="score"), binary).labels.tolist() == [1, 0, 0]
    regression = infer_label_map(table, column="score", num_labels=1)
    targets = table_texts(table, Columns("text", label="score"), regression).labels
    assert targets.dtype == np.float32 and targets.tolist() == pytest.approx([2.5, 0.0, -1e-3])
    assert LabelMap.from_dict(json.loads(json.dumps(binary.to_dict()))) == binary
    with pytest.raises(DataError, match="binary label, but the bundle's head has 3 outputs"):
        infer_label_map(table, column="score", num_labels=3, threshold=0.0)


@pytest.mark.parametrize(
    ("name", "content", "call", "message"),
    [
        ("e.csv", "", "read", r"e\.csv: the file is empty"),
        ("h.csv", "text,label\n", "read", r"h\.csv: the file has no data rows"),
        ("e.jsonl", "\n\n", "read", r"e\.jsonl: the file is empty"),
        ("m.jsonl", '{"text": "a"}\n{"text": oops}\n', "read", r"m\.jsonl:2: malformed JSON"),
        ("l.jsonl", '["a", 1]\n', "read", r"l\.jsonl:1: expected a JSON object, got list"),
        ("f.tsv", "text\tlabel\na\t1\nb\t1\textra\n", "read", r"f\.tsv:3: 3 fields, but the header has 2"),
        ("d.csv", "text,text\na,b\n", "read", r"d\.csv:1: the header repeats column\(s\) text"),
        ("c.csv", "sentence,label\na,1\n", "texts", r"c\.csv: no column 'text' \(the text column\); the file has: sentence, label"),
        ("u.csv", "text,label\na,pos\nb,neg\n", "known", r"u\.csv:3: column 'label': unknown label 'neg'; this run's labels are pos, other"),
        ("n.csv", "text,label\na,1\nb,high\n", "regression", r"n\.csv:3: column 'label': expected a finite number, got 'high'"),
        ("k.csv", "text,label\na,x\nb,y\nc,z\n", "infer", r"k\.csv: column 'label' has 3 distinct labels \(x, y, z\), but the bundle's head has 2"),
        ("v.jsonl", '{"text": 3, "label": 1}\n', "texts", r"v\.jsonl:1: column 'text': expected text, got int 3"),
        ("w.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', "infer", r"w\.jsonl:2: column 'label': the value is missing"),
        ("b.csv", b"text,label\n\xff,1\n", "read", r"b\.csv: not UTF-8 text"),
        ("q.csv", 'text,label\n"good",1\n"never closed,0\nthird,1\nfourth,0\n', "read",
         r"q\.csv:3: 1 fields, but the header has 2 \(text, label\); a quote opened on line 3 is not closed"),
        ("nan.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": NaN}\n', "read",
         r"nan\.jsonl:2: malformed JSON: NaN is not a JSON number"),
        ("inf.jsonl", '{"text": "a", "label": -Infinity}\n', "read", r"inf\.jsonl:1: malformed JSON: -Infinity"),
    ],
)
def test_errors_name_the_file_line_and_column(tmp_path, name, content, call, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    columns = Columns("text", label="label")
    with pytest.raises(DataError, match=message):
        table = read_table(path)
        if call == "texts":
            table_texts(table, columns, LabelMap("classification", ("0", "1")))
        elif call == "known":
            table_texts(table, columns, LabelMap("classification", ("pos", "other")))
        elif call == "regression":
            table_texts(table, columns, LabelMap("regression"))
        elif call == "infer":
            infer_label_map(table, column="label", num_labels=2)


def test_missing_file_and_unwritable_prediction_format(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_table(tmp_path / "absent.csv")
    with pytest.raises(DataError, match=r"\.csv or \.jsonl"):
        write_rows(tmp_path / "p.tsv", [], columns=["text"])


def test_written_predictions_read_back(tmp_path):
    rows = [{"text": 'say "hi", twice', "label": "pos", "score": 0.75}, {"text": "ünï\ncode", "label": "neg", "score": 0.5}]
    for name in ("p.csv", "p.jsonl"):
        write_rows(tmp_path / name, rows, columns=["text", "label", "score"])
        back = read_table(tmp_path / name)
        assert [r["text"] for _, r in back.rows] == [r["text"] for r in rows]
        assert [float(r["score"]) for _, r in back.rows] == [0.75, 0.5]


def test_holdout_split_is_fixed_by_the_seed():
    train, test = holdout_split(100, fraction=0.2, seed=7)
    assert len(test) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    again, _ = holdout_split(100, fraction=0.2, seed=7)
    other, _ = holdout_split(100, fraction=0.2, seed=8)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


def test_the_movie_review_snippets_load_with_a_threshold():
    table = read_table(movie_reviews_path())
    assert table.columns == ("id", "sentiment", "text")
    label_map = infer_label_map(table, column="sentiment", num_labels=2, threshold=0.0)
    data = table_texts(table, Columns("text", label="sentiment"), label_map)
    assert len(data) == 10605  # `wc -l` says 10,604: it misses the unterminated last line
    assert int(data.labels.sum()) == 5242  # sentiment > 0, counted with awk
    assert data.texts[7872].endswith('into a 9" black and white portable TV.')


# --- tokenization -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_path()))


TEXTS = ["A gorgeous, witty, seductive movie.", "Tedious.", "The Rock is destined to be the 21st Century's new Conan " * 4]
PAIRS = ["Is it good?", "It is not good at all, and it goes on and on and on.", "Yes."]


@pytest.mark.parametrize("max_length", [12, 66, 128])
@pytest.mark.parametrize("pairs", [None, PAIRS])
def test_tokenizer_matches_the_models_own_tokenizer(hf_tokenizer, max_length, pairs):
    tokenizer = EdgeTokenizer(minilm_path() / "tokenizer.json", max_length=max_length, pad_id=0)
    batch, lengths = tokenizer.encode(TEXTS, pairs)
    expected = hf_tokenizer(TEXTS, pairs, padding="longest", truncation="longest_first", max_length=max_length,
                            return_tensors="np")
    assert batch.input_ids.dtype == np.int64 and lengths.dtype == np.int32
    np.testing.assert_array_equal(batch.input_ids, expected["input_ids"])
    np.testing.assert_array_equal(batch.attention_mask, expected["attention_mask"])
    np.testing.assert_array_equal(batch.token_type_ids, expected["token_type_ids"])
    b, length = batch.shape
    assert length == min(max_length, int(expected["attention_mask"].sum(1).max()))  # not the file's fixed 128
    np.testing.assert_array_equal(batch.position_ids, np.tile(np.arange(length), (b, 1)))
    np.testing.assert_array_equal(lengths, expected["attention_mask"].sum(1))
    for row, n in enumerate(lengths):  # right padding: real tokens first, then PAD ids
        assert batch.attention_mask[row, :n].all() and not batch.attention_mask[row, n:].any()
        assert not batch.input_ids[row, n:].any()


def test_a_short_batch_is_padded_to_its_longest_row_only():
    tokenizer = EdgeTokenizer(minilm_path() / "tokenizer.json", max_length=128, pad_id=0)
    batch, lengths = tokenizer.encode(["hi", "hello there"])
    assert batch.shape == (2, 4) and lengths.tolist() == [3, 4]
    with pytest.raises(ValueError, match="2 texts but 1 pair"):
        tokenizer.encode(["a", "b"], ["c"])

