"""The builtin tokenizer (trained locally) and Hugging Face tokenizer directories."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from longtrain.data.tokenizer import BUILTIN_EOS, load_tokenizer

TEXTS = ["The pass key is 12345. Remember it.", "  leading spaces\n\nand\ttabs", "Ünïcödé 漢字 🙂 ok",
         "def f(x):\n    return x * 2  # comment\n", ""]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("builtin", cache_dir=tmp_path_factory.mktemp("cache"))


def test_builtin_basics(tok):
    assert tok.vocab_size == 512 and tok.add_bos
    specials = {tok.bos_id, tok.eos_id, tok.pad_id}
    assert len(specials) == 3 and all(0 <= i < tok.vocab_size for i in specials)
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text  # byte-level: lossless on any text
        assert not specials & set(ids)  # encode adds no special token
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_builtin_digits_are_single_tokens(tok):
    digit_ids = [tok.encode(str(d)) for d in range(10)]
    assert all(len(ids) == 1 for ids in digit_ids)
    # inside text every digit is its own token, whatever surrounds it
    for number in ["1234567890", "x90210y", " 007."]:
        ids = tok.encode(number)
        digits = [c for c in number if c.isdigit()]
        assert [i for i in ids if [i] in digit_ids] == [tok.encode(c)[0] for c in digits]


def test_builtin_cache_and_determinism(tok, tmp_path):
    again = load_tokenizer("builtin", cache_dir=tmp_path)  # trained afresh in an empty cache
    cached = list((tmp_path / "tokenizers").glob("builtin-512-*/tokenizer.json"))
    assert len(cached) == 1
    assert load_tokenizer("builtin", cache_dir=tmp_path).encode(TEXTS[0]) == again.encode(TEXTS[0])
    for text in TEXTS:  # training is deterministic: another cache gives the same ids
        assert again.encode(text) == tok.encode(text)
    big = load_tokenizer("builtin:1024", cache_dir=tmp_path)
    assert big.vocab_size == 1024 and len(big.encode(TEXTS[0])) < len(tok.encode(TEXTS[0]))


def test_save_loads_in_transformers(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path / "tok")
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= {
        p.name for p in (tmp_path / "tok").iterdir()}
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == [tok.bos_id] + tok.encode(text)  # BOS added as the model expects
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    # and our loader reads the directory back as an HF tokenizer with the same behaviour
    back = load_tokenizer(str(tmp_path / "tok"))
    assert (back.bos_id, back.eos_id, back.add_bos, back.vocab_size) == (tok.bos_id, tok.eos_id, True, 512)
    assert back.encode_batch(TEXTS) == tok.encode_batch(TEXTS)
    assert back.decode(back.encode(TEXTS[2])) == TEXTS[2]


def test_hf_dir_without_bos(tok, tmp_path):
    """A Qwen-like tokenizer: no BOS token, nothing prepended; pad falls back to EOS."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as RawTokenizer

    tok.save(tmp_path / "src")
    raw = RawTokenizer.from_file(str(tmp_path / "src" / "tokenizer.json"))
    raw.post_processor = None
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=BUILTIN_EOS)
    hf.chat_template = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n"
                        "{% endfor %}")
    hf.save_pretrained(tmp_path / "qwenlike")
    q = load_tokenizer(str(tmp_path / "qwenlike"))
    assert q.bos_id is None and not q.add_bos and q.pad_id == q.eos_id == tok.eos_id
    assert q.encode(TEXTS[0]) == tok.encode(TEXTS[0])
    msgs = [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]
    segments = q.apply_chat_template(msgs)
    assert [t for _, t in segments] == [False, True]
    full = hf.apply_chat_template(msgs, tokenize=True)
    full = list(full["input_ids"]) if hasattr(full, "keys") else list(full)
    assert [i for ids, _ in segments for i in ids] == full


def test_builtin_chat_segments(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}]
    segments = tok.apply_chat_template(msgs)
    trainable = [i for ids, t in segments if t for i in ids]
    assert tok.decode(trainable) == " Hello.\n" + "<|eos|>"
    assert tok.decode([i for ids, _ in segments for i in ids]).startswith("system: Be brief.\nuser: Hi\n")
    with pytest.raises(ValueError, match="message 1"):
        tok.apply_chat_template([msgs[0], {"role": "user"}])


def test_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="/no/such/tokenizer.* does not exist"):
        load_tokenizer("/no/such/tokenizer")
    (tmp_path / "file.json").write_text(json.dumps({}))
    with pytest.raises(ValueError, match="not a directory"):
        load_tokenizer(str(tmp_path / "file.json"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    for bad in ["builtin:abc", "builtin:10", "builtin:100000", "builtin:4096"]:
        with pytest.raises(ValueError, match="builtin"):
            load_tokenizer(bad, cache_dir=tmp_path)
    assert not Path("/no/such/tokenizer").exists()
