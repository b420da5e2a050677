"""Documents for perplexity evals: local files through `datasets`, or the offline corpora of longtrain.data."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from longtrain.data.tokenizer import Tokenizer

BUILTIN_SOURCES = ("tiny", "stdlib")


def load_documents(path: str, text_field: str = "text", max_docs: int | None = None) -> list[str]:
    """Texts of the documents of an eval set.

    Args:
        path: a local file (.jsonl / .json / .parquet / .csv read with `datasets`; .txt = one document), a
            directory written by `datasets.Dataset.save_to_disk`, or a built-in source: "tiny" (the bundled tiny
            corpus: short documents) or "stdlib" (the Python standard library's source files: long real text).
        text_field: the column holding the text (files and saved datasets).
        max_docs: keep at most this many documents (the first ones).

    Returns:
        The document texts (empty ones dropped).

    Raises:
        ValueError: missing path, unknown file type, missing text column, or no non-empty document.
    """
    from longtrain.data.corpus import read_tiny_corpus, stdlib_documents

    match path:
        case "tiny":
            texts = read_tiny_corpus()
        case "stdlib":
            texts = [text for _name, text in stdlib_documents(min_chars=20000, max_docs=max_docs)]
        case _:
            texts = _read_file(Path(path), text_field)
    texts = [t for t in texts if t and t.strip()]
    if max_docs is not None:
        texts = texts[:max_docs]
    if not texts:
        raise ValueError(f"eval data {path!r} holds no non-empty document (field {text_field!r})")
    return texts


def _read_file(p: Path, text_field: str) -> list[str]:
    import datasets

    if not p.exists():
        raise ValueError(f"eval data {str(p)!r} does not exist; give a .jsonl/.json/.parquet/.csv/.txt file, a "
                         f"saved `datasets` directory, or one of {', '.join(BUILTIN_SOURCES)}")
    if p.is_file() and p.stat().st_size == 0:
        raise ValueError(f"eval data {str(p)!r} is an empty file: no documents to evaluate")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if "test" not in ds and "validation" not in ds and "train" not in ds:
                raise ValueError(f"eval data {str(p)!r}: a DatasetDict without test/validation/train split "
                                 f"(has {list(ds)})")
            ds = ds["test"] if "test" in ds else ds["validation"] if "validation" in ds else ds["train"]
    else:
        match p.suffix.lower():
            case ".jsonl" | ".json":
                builder = "json"
            case ".parquet":
                builder = "parquet"
            case ".csv":
                builder = "csv"
            case ".txt":
                return [p.read_text(encoding="utf-8")]
            case other:
                raise ValueError(f"eval data {str(p)!r}: unsupported file type {other!r}; valid: .jsonl, .json, "
                                 ".parquet, .csv, .txt, or a saved `datasets` directory")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train")
    if text_field not in ds.column_names:
        raise ValueError(f"eval data {str(p)!r} has no column {text_field!r}; columns: {ds.column_names} "
                         f"(choose one with --text-field)")
    return [str(t) for t in ds[text_field] if t is not None]


def tokenize_documents(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each document, with BOS first when the tokenizer's model expects it."""
    bos = [tok.bos_id] if tok.add_bos and tok.bos_id is not None else []
    return [bos + ids for ids in tok.encode_batch(list(texts))]
