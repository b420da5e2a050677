"""The loader: exact resume, disjoint data-parallel ranks, DP x CP sharding, mixture shares, file formats."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from longtrain.data.batch import IGNORE_INDEX
from longtrain.data.loader import build_loader
from longtrain.data.sources import SourceSpec
from longtrain.data.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer("builtin", cache_dir=tmp_path_factory.mktemp("tokcache"))


def _write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return str(path)


def _doc_text(i: int, rng: np.random.Generator) -> str:
    words = ["alpha", "beta", "gamma", "delta", "river", "stone", "lamp"]
    return f"doc{i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 120))))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    _write_jsonl(d / "a.jsonl", [_doc_text(i, rng) for i in range(150)])
    _write_jsonl(d / "b.jsonl", [_doc_text(1000 + i, rng) for i in range(150)])
    _write_jsonl(d / "c.jsonl", [f"doc{2000 + i}: short" for i in range(4)])  # tiny: epochs roll over
    return d


def _same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("input_ids", "labels", "position_ids", "doc_ids"))


def _mixture(corpus):
    return [SourceSpec(str(corpus / "a.jsonl"), weight=0.5, upsample_long=60, upsample_factor=2.5),
            SourceSpec(str(corpus / "b.jsonl"), weight=0.3, streaming=True),
            SourceSpec("builtin:tiny_chat", messages_field="messages", weight=0.1),
            SourceSpec("synthetic:passkey", weight=0.1, options={"length": 150}),
            SourceSpec(str(corpus / "c.jsonl"), weight=0.05),
            SourceSpec(str(corpus / "c.jsonl"), weight=0.05, streaming=True)]


@pytest.mark.parametrize("prefetch", [0, 3])
@pytest.mark.parametrize("packing", ["continuous", "anchor"])
def test_resume_is_exact(tok, corpus, tmp_path, prefetch, packing):
    kw = dict(packing=packing, seed=5, prefetch=prefetch, cache_dir=str(tmp_path))
    full = build_loader(_mixture(corpus), tok, 160, 2, **kw)
    expected = [next(full) for _ in range(40)]
    assert full.state_dict()["sources"][4]["epoch"] >= 2 and full.state_dict()["sources"][5]["epoch"] >= 2
    full.close()
    first = build_loader(_mixture(corpus), tok, 160, 2, **kw)
    for b in expected[:17]:
        assert _same(next(first), b)
    state = json.loads(json.dumps(first.state_dict()))  # plain data: it survives any checkpoint format
    first.close()
    resumed = build_loader(_mixture(corpus), tok, 160, 2, **kw)
    resumed.load_state_dict(state)
    for i, b in enumerate(expected[17:]):
        assert _same(next(resumed), b), f"batch {17 + i} differs after resume"
    resumed.close()
    assert state["batches"] == 17
    with pytest.raises(ValueError, match="seed: 5 vs 6"):
        build_loader(_mixture(corpus), tok, 160, 2, **{**kw, "seed": 6}).load_state_dict(state)


def _doc_markers(tok, batch) -> set[str]:
    return set(re.findall(r"doc(\d+):", tok.decode(batch.input_ids.flatten().tolist())))


def test_dp_ranks_read_disjoint_documents(tok, corpus, tmp_path):
    spec = [SourceSpec(str(corpus / "a.jsonl"))]
    loaders = [build_loader(spec, tok, 128, 2, dp_rank=r, dp_size=3, seed=1, prefetch=0, cache_dir=str(tmp_path))
               for r in range(3)]
    orders = [l.sources[0]._epoch_order(0) for l in loaders]
    assert sorted(np.concatenate(orders).tolist()) == list(range(150))  # a partition of the epoch
    seen = [set().union(*(_doc_markers(tok, next(l)) for _ in range(6))) for l in loaders]
    assert all(seen) and not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    with pytest.raises(ValueError, match="0 <= dp_rank < dp_size"):
        build_loader(spec, tok, 128, 2, dp_rank=3, dp_size=3, cache_dir=str(tmp_path))


def test_dp_x_cp_sharding(tok, corpus, tmp_path):
    prepare_cp_inputs = pytest.importorskip("longtrain.parallel.cp_shard").prepare_cp_inputs
    dp, cp, seq_len = 2, 2, 390
    spec = [SourceSpec(str(corpus / "a.jsonl")), SourceSpec("synthetic:needle", options={"length": 380, "n_keys": 2})]
    global_rows, shards = [], []
    for dp_rank in range(dp):
        # every cp rank of the group builds its own loader: they must agree batch for batch
        group = [build_loader(spec, tok, seq_len, 2, dp_rank=dp_rank, dp_size=dp, seed=3, prefetch=1,
                              packing="anchor", cache_dir=str(tmp_path)) for _ in range(cp)]
        batches = [next(l) for l in group]
        assert all(_same(b, batches[0]) for b in batches[1:])
        global_rows.append(batches[0])
        shards.append([prepare_cp_inputs(b, r, cp, "zigzag") for r, b in enumerate(batches)])
        for l in group:
            l.close()
    for dp_rank in range(dp):  # the union of the cp shards of each group is that group's batch
        g = global_rows[dp_rank]
        for field in ("input_ids", "labels", "position_ids", "doc_ids"):
            rebuilt = torch.empty_like(getattr(g, field))
            for s in shards[dp_rank]:
                keep = s.seq_index[0] < seq_len
                rebuilt[:, s.seq_index[0][keep]] = getattr(s, field)[:, keep]
            assert torch.equal(rebuilt, getattr(g, field)), field
    assert not torch.equal(global_rows[0].input_ids, global_rows[1].input_ids)


def test_mixture_token_shares(tok, corpus, tmp_path):
    spec = [SourceSpec(str(corpus / "a.jsonl"), weight=3.0), SourceSpec(str(corpus / "b.jsonl"), weight=1.0)]
    loader = build_loader(spec, tok, 256, 4, prefetch=0, cache_dir=str(tmp_path))
    for _ in range(10):
        next(loader)
    emitted = np.array(loader.state_dict()["emitted"], dtype=float)
    longest = max(loader.sources[0].lengths.max(), loader.sources[1].lengths.max())
    assert abs(emitted[0] / 3.0 - emitted[1]) <= longest  # deficit scheduling: within one document
    assert abs(emitted[0] / emitted.sum() - 0.75) < 0.05


def test_filters_and_upsampling(tok, corpus, tmp_path):
    spec = SourceSpec(str(corpus / "a.jsonl"), min_tokens=40, max_tokens=100, upsample_long=90, upsample_factor=3.0)
    loader = build_loader([spec], tok, 64, 1, prefetch=0, cache_dir=str(tmp_path))
    src = loader.sources[0]
    st = src.stats
    assert st.records == 150 and st.documents + st.filtered_short + st.filtered_long == 150
    assert st.filtered_short > 0 and st.filtered_long > 0 and st.bad_records == 0
    assert ((src.lengths >= 40) & (src.lengths <= 100)).all()
    order = src._epoch_order(0)
    counts = np.bincount(order, minlength=len(src.lengths))
    assert (counts[src.lengths >= 90] == 3).all() and (counts[src.lengths < 90] == 1).all()
    with pytest.raises(ValueError, match="no usable document"):
        build_loader([SourceSpec(str(corpus / "a.jsonl"), min_tokens=10_000)], tok, 64, 1, cache_dir=str(tmp_path))


def test_chat_prompt_tokens_are_masked(tok, tmp_path):
    path = tmp_path / "chat.jsonl"
    conv = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "It is 5."}]
    path.write_text(json.dumps({"messages": conv}) + "\n")
    loader = build_loader([SourceSpec(str(path), messages_field="messages")], tok, 32, 1, packing="reset",
                          prefetch=0, cache_dir=str(tmp_path))
    b = next(loader)
    targets = b.labels[0][b.labels[0] != IGNORE_INDEX].tolist()
    assert tok.decode(targets) == " It is 5.\n<|eos|>"  # only the assistant's answer is trained
    assert b.input_ids[0, 0] == tok.bos_id


def test_file_formats_agree(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    texts = [f"Document number {i}. " * (i % 5 + 1) for i in range(40)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", texts)
    datasets.Dataset.from_dict({"body": texts}).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": texts})}).save_to_disk(
        str(tmp_path / "saveddict"))
    (tmp_path / "txt").mkdir()
    for i, t in enumerate(texts):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(t)
    specs = [SourceSpec(jsonl), SourceSpec(str(tmp_path / "d.parquet"), text_field="body"),
             SourceSpec(str(tmp_path / "saved"), text_field="body"),
             SourceSpec(str(tmp_path / "saveddict"), text_field="body", split="validation"),
             SourceSpec(str(tmp_path / "txt")), SourceSpec(str(tmp_path / "txt" / "*.txt")),
             SourceSpec(jsonl, streaming=True), SourceSpec(str(tmp_path / "saved"), text_field="body", streaming=True)]
    batches = []
    for spec in specs:
        loader = build_loader([spec], tok, 48, 3, prefetch=0, cache_dir=str(tmp_path / "cache"))
        batches.append([next(loader) for _ in range(3)])
        assert loader.stats[0].documents > 0
    for other in batches[1:6]:  # map-style sources of the same documents give the same batches
        assert all(_same(a, b) for a, b in zip(batches[0], other))
    for other in batches[6:]:  # streaming reads in file order: the same documents, unshuffled
        assert all(_same(a, b) for a, b in zip(batches[6], other))
    with pytest.raises(ValueError, match="no split 'test'"):
        build_loader([SourceSpec(str(tmp_path / "saveddict"), text_field="body", split="test")], tok, 48, 1)


def test_stdlib_documents_are_real_text():
    from longtrain.data.corpus import stdlib_documents

    docs = list(stdlib_documents(min_chars=20_000, max_docs=3))
    assert len(docs) == 3 and all(len(t) >= 20_000 and name.endswith(".py") for name, t in docs)
    assert docs == list(stdlib_documents(min_chars=20_000, max_docs=3))  # deterministic order


@pytest.mark.parametrize("task,options", [
    ("passkey", {"depth": 0.5, "loss_on": "answer"}), ("needle", {"n_keys": 2}), ("shuffled_chunks", {"n_chunks": 4}),
    ("variable_tracking", {"n_hops": 2}), ("common_words", {"n_common": 3, "common_freq": 4, "rare_freq": 2})])
def test_synthetic_sources(tok, task, options):
    loader = build_loader([SourceSpec(f"synthetic:{task}", options=options)], tok, 512, 2, seed=9, prefetch=0,
                          packing="reset")
    b = next(loader)
    assert b.input_ids.shape == (2, 512) and not torch.equal(b.input_ids[0], b.input_ids[1])
    assert (b.doc_ids == 0).all() and b.input_ids[0, 0] == tok.bos_id  # one whole task per sequence
    valid = (b.labels != IGNORE_INDEX).sum(1)
    if options.get("loss_on") == "answer":  # only the 5 passkey digits and the space before them
        assert valid.tolist() == [len(tok.encode(" 12345"))] * 2
    else:
        assert (valid == 511).all()


def test_tokenization_is_cached_and_invalidated(tok, tmp_path):
    path = tmp_path / "docs.jsonl"
    _write_jsonl(path, [f"Cached document {i}." for i in range(20)])
    cache = tmp_path / "cache"
    first = build_loader([SourceSpec(str(path))], tok, 32, 1, prefetch=0, cache_dir=str(cache))
    files = sorted(p for p in cache.rglob("*") if p.is_file())
    again = build_loader([SourceSpec(str(path))], tok, 32, 1, prefetch=0, cache_dir=str(cache))
    assert sorted(p for p in cache.rglob("*") if p.is_file()) == files  # nothing re-read or re-tokenized
    assert _same(next(first), next(again))
    with open(path, "a") as f:  # a changed file (size, mtime) is read again
        f.write(json.dumps({"text": "One more."}) + "\n")
    assert build_loader([SourceSpec(str(path))], tok, 32, 1, prefetch=0, cache_dir=str(cache)).stats[0].documents == 21


def test_bundled_corpus_is_reproducible():
    from longtrain.data.corpus import ASSETS, TINY_CHAT, read_tiny_corpus, tiny_chat_conversations, tiny_corpus_documents

    assert read_tiny_corpus() == tiny_corpus_documents()  # the asset is exactly what the generator writes
    assert [json.loads(line)["messages"] for line in TINY_CHAT.read_text().splitlines()] == tiny_chat_conversations()
    assert sum(p.stat().st_size for p in ASSETS.iterdir()) < 2_000_000  # package data stays small


@pytest.mark.parametrize("min_tokens", [0, 120])
def test_map_source_rows_match_the_documents(tok, tmp_path, min_tokens):
    """Every row read from the Arrow buffers (several chunks; one after a length filter) is its document."""
    from longtrain.data.corpus import read_tiny_corpus

    loader = build_loader([SourceSpec("builtin:tiny", min_tokens=min_tokens)], tok, 64, 1, prefetch=0,
                          cache_dir=str(tmp_path))
    src = loader.sources[0]
    expected = [x for x in ([tok.bos_id] + ids + [tok.eos_id] for ids in tok.encode_batch(read_tiny_corpus()))
                if len(x) >= min_tokens]
    assert len(expected) == src.stats.documents and (len(src._ids) > 1 if min_tokens == 0 else
                                                     src.stats.filtered_short > 0)
    order = src._epoch_order(0)
    for row in order:
        assert src.next_doc().ids.tolist() == expected[row]


def test_streaming_dp_ranks_are_disjoint(tok, corpus, tmp_path):
    spec = [SourceSpec(str(corpus / "a.jsonl"), streaming=True)]
    seen = []
    for r in range(2):
        loader = build_loader(spec, tok, 128, 2, dp_rank=r, dp_size=2, prefetch=0, cache_dir=str(tmp_path))
        seen.append(set().union(*(_doc_markers(tok, next(loader)) for _ in range(8))))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert seen[0] | seen[1] <= {str(i) for i in range(150)}
