"""Bad data: each case is a clear error naming file and line, or (on_bad_record=skip) skipped and counted."""

from __future__ import annotations

import json
import logging

import pytest

from longtrain.data.loader import build_loader
from longtrain.data.sources import BadRecordError, SourceSpec
from longtrain.data.tokenizer import load_tokenizer

GOOD = [json.dumps({"text": f"A good document number {i}."}).encode() for i in range(6)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("builtin", cache_dir=tmp_path_factory.mktemp("tokcache"))


def _jsonl(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + (b"\n" if lines else b""))
    return str(path)


# (name, file lines, line number of the bad record, message pattern)
CASES = [
    ("missing_field", GOOD[:2] + [json.dumps({"body": "no text here"}).encode()] + GOOD[2:],
     3, r"missing field 'text' \(fields: body\)"),
    ("non_utf8", GOOD[:3] + [b'{"text": "caf\xe9 au lait"}'] + GOOD[3:], 4, "not valid UTF-8"),
    ("corrupt_json", GOOD[:1] + [b'{"text": "unterminated'] + GOOD[1:], 2, "corrupt JSON"),
    ("zero_length", GOOD[:4] + [json.dumps({"text": ""}).encode()] + GOOD[4:], 5, "zero-length document"),
    ("not_string", GOOD[:2] + [json.dumps({"text": 42}).encode()] + GOOD[2:], 3,
     "field 'text' must be a string, got int"),
    ("not_object", GOOD[:5] + [b'["a", "list"]'] + GOOD[5:], 6, "expected a JSON object, got list"),
]


@pytest.mark.parametrize("name,lines,line,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_jsonl_record(tok, tmp_path, caplog, name, lines, line, pattern):
    path = _jsonl(tmp_path / f"{name}.jsonl", lines)
    with pytest.raises(BadRecordError, match=rf"{path}:{line}: {pattern}.*on_bad_record=skip"):
        build_loader([SourceSpec(path)], tok, 32, 1, prefetch=0, cache_dir=str(tmp_path / "c1"))
    with caplog.at_level(logging.WARNING, logger="longtrain.data"):
        loader = build_loader([SourceSpec(path)], tok, 32, 1, on_bad_record="skip", prefetch=0,
                              cache_dir=str(tmp_path / "c2"))
    st = loader.stats[0]
    assert (st.records, st.bad_records, st.documents) == (len(lines), 1, len(lines) - 1)
    assert st.bad_examples[0].startswith(f"{path}:{line}: ")
    assert f"skipped 1 bad record(s) of {len(lines)}" in caplog.text and f"{path}:{line}" in caplog.text
    next(loader)
    # the skip count survives the datasets cache: a second build reads cached Arrow files and still reports it
    again = build_loader([SourceSpec(path)], tok, 32, 1, on_bad_record="skip", prefetch=0,
                         cache_dir=str(tmp_path / "c2"))
    assert again.stats[0].bad_records == 1


def test_bad_record_streaming(tok, tmp_path, caplog):
    path = _jsonl(tmp_path / "s.jsonl", GOOD[:2] + [b"{oops"] + GOOD[2:])
    loader = build_loader([SourceSpec(path, streaming=True)], tok, 16, 1, prefetch=0, cache_dir=str(tmp_path))
    with pytest.raises(BadRecordError, match=rf"{path}:3: corrupt JSON"):
        for _ in range(20):
            next(loader)
    with caplog.at_level(logging.WARNING, logger="longtrain.data"):
        loader = build_loader([SourceSpec(path, streaming=True)], tok, 16, 1, on_bad_record="skip", prefetch=2,
                              cache_dir=str(tmp_path))
        for _ in range(20):
            next(loader)
        loader.close()
    assert loader.stats[0].bad_records >= 1 and f"{path}:3: corrupt JSON" in caplog.text


def test_empty_files(tok, tmp_path):
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(BadRecordError, match=rf"{empty}: empty file"):
        build_loader([SourceSpec(empty)], tok, 16, 1, cache_dir=str(tmp_path))
    # skipped and counted, but a source with nothing left is still an error
    with pytest.raises(ValueError, match=r"no usable document \(1 records, 1 bad"):
        build_loader([SourceSpec(empty)], tok, 16, 1, on_bad_record="skip", cache_dir=str(tmp_path))
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("Some text.")
    (tmp_path / "txt" / "b.txt").write_bytes(b"")
    (tmp_path / "txt" / "c.txt").write_bytes(b"line one\nline \xff two\n")
    with pytest.raises(BadRecordError, match=r"b.txt: empty file"):
        build_loader([SourceSpec(str(tmp_path / "txt"))], tok, 16, 1, cache_dir=str(tmp_path))
    loader = build_loader([SourceSpec(str(tmp_path / "txt"))], tok, 16, 1, on_bad_record="skip",
                          cache_dir=str(tmp_path))
    assert loader.stats[0].bad_records == 2 and loader.stats[0].documents == 1
    assert any("c.txt:2: not valid UTF-8" in r for r in loader.stats[0].bad_examples)


def test_parquet_problems(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["fine", None, "", "also fine"]}).to_parquet(str(tmp_path / "p.parquet"))
    p = str(tmp_path / "p.parquet")
    with pytest.raises(BadRecordError, match=rf"{p} row 1: field 'text' must be a string, got NoneType"):
        build_loader([SourceSpec(p)], tok, 16, 1, cache_dir=str(tmp_path))
    loader = build_loader([SourceSpec(p)], tok, 16, 1, on_bad_record="skip", cache_dir=str(tmp_path))
    assert (loader.stats[0].bad_records, loader.stats[0].documents) == (2, 2)
    with pytest.raises(ValueError, match=rf"{p}: missing column 'body' \(columns: text\)"):
        build_loader([SourceSpec(p, text_field="body")], tok, 16, 1, cache_dir=str(tmp_path))
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="broken.parquet: not a readable Parquet file"):
        build_loader([SourceSpec(str(tmp_path / "broken.parquet"))], tok, 16, 1, cache_dir=str(tmp_path))
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved'?: missing column 'text' \(columns: body\)"):
        build_loader([SourceSpec(str(tmp_path / "saved"))], tok, 16, 1, cache_dir=str(tmp_path))


def test_bad_paths_and_specs(tok, tmp_path):
    with pytest.raises(ValueError, match="/no/such/file.jsonl' does not exist"):
        build_loader([SourceSpec("/no/such/file.jsonl")], tok, 16, 1)
    with pytest.raises(ValueError, match="/no/such/tokenizer.* does not exist"):
        load_tokenizer("/no/such/tokenizer")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data.csv': unknown format; supported: .jsonl"):
        build_loader([SourceSpec(str(tmp_path / "data.csv"))], tok, 16, 1)
    with pytest.raises(ValueError, match="matches no file"):
        build_loader([SourceSpec(str(tmp_path / "*.jsonl"))], tok, 16, 1)
    with pytest.raises(ValueError, match="unknown synthetic task 'sudoku'"):
        build_loader([SourceSpec("synthetic:sudoku")], tok, 256, 1)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        build_loader([SourceSpec("synthetic:passkey", options={"colour": 1})], tok, 256, 1)
    with pytest.raises(ValueError, match="weight must be > 0"):
        SourceSpec("x.jsonl", weight=0)
    with pytest.raises(NotImplementedError, match="upsample_long .* streaming"):
        SourceSpec("x.jsonl", streaming=True, upsample_long=100)
    with pytest.raises(ValueError, match="unknown on_bad_record 'ignore'; valid: error, skip"):
        build_loader([SourceSpec("builtin:tiny")], tok, 16, 1, on_bad_record="ignore")
    with pytest.raises(ValueError, match="unknown packing mode 'packed'"):
        build_loader([SourceSpec("builtin:tiny")], tok, 16, 1, packing="packed")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    with pytest.raises(ValueError, match=r"array.json:1: a JSON array, not JSON Lines"):
        build_loader([SourceSpec(str(array))], tok, 16, 1, on_bad_record="skip", cache_dir=str(tmp_path))
    bad_chat = _jsonl(tmp_path / "chat.jsonl", [json.dumps({"messages": [{"role": "user"}]}).encode()])
    with pytest.raises(BadRecordError, match=rf"{bad_chat}:1: field 'messages' must be a non-empty list"):
        build_loader([SourceSpec(bad_chat, messages_field="messages")], tok, 16, 1, cache_dir=str(tmp_path))
