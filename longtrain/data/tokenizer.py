"""Tokenizers: the builtin byte-level BPE (trained locally on the bundled corpus) or a Hugging Face directory.

`load_tokenizer("builtin")` trains a small byte-level BPE with the `tokenizers` library on
`assets/tiny_corpus.jsonl` + `assets/tiny_chat.jsonl` at first use and caches it (keyed by a hash of the corpus
and the training settings) under `~/.cache/longtrain/tokenizers/`. Digits are split one by one before BPE, so
"0".."9" are single tokens and a passkey's digits are each one prediction (as in Llama-2 / Mistral style
tokenizers).

`load_tokenizer("/path/to/hf_model")` wraps `transformers.AutoTokenizer` (the model's own tokenizer, local only).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from longtrain.data.corpus import TINY_CHAT, TINY_CORPUS

BUILTIN_BOS = "<|bos|>"
BUILTIN_EOS = "<|eos|>"
BUILTIN_PAD = "<|pad|>"
BUILTIN_DEFAULT_VOCAB = 512  # matches the `debug` model flavor (model/args.py)
# Every merge the bundled corpus supports: BPE stops there, so builtin:2048 or :8192 gave the same 1,193 ids
# (checked: identical tokenizer.json). A larger N is an error, not a silently smaller vocabulary (issue 20).
BUILTIN_MAX_VOCAB = 1193
_BUILTIN_VERSION = 1  # bump when the training recipe below changes: it is part of the cache key


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/longtrain` (default `~/.cache/longtrain`)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "longtrain"


class Tokenizer:
    """A tokenizer as the data pipeline needs it.

    Attributes:
        bos_id: id of the beginning-of-sequence token, None when the model has none (Qwen).
        eos_id: id of the end-of-sequence / end-of-document token placed between packed documents.
        pad_id: id used for padding (labels of padding are always -100, so its value never trains).
        vocab_size: number of ids (including added special tokens); the model's embedding must be at least this.
        add_bos: whether the model expects BOS at the start of each document (Llama-3 yes, Qwen no).
        name: the path it was loaded from ("builtin" or a directory).
    """

    def __init__(self, backend: Any, *, kind: str, bos_id: int | None, eos_id: int, pad_id: int,
                 vocab_size: int, add_bos: bool, name: str, fingerprint: str, chat_template: str | None = None):
        self._backend = backend  # tokenizers.Tokenizer (kind "builtin") or a transformers tokenizer (kind "hf")
        self._kind = kind
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.add_bos = add_bos
        self.name = name
        self.fingerprint = fingerprint  # changes whenever the ids could change: keys tokenization caches
        self.chat_template = chat_template

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without any special token."""
        match self._kind:
            case "builtin":
                return self._backend.encode(text, add_special_tokens=False).ids
            case "hf":
                return self._backend.encode(text, add_special_tokens=False)
            case _:
                raise AssertionError(self._kind)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts at once (the Rust backend runs them in parallel), without special tokens."""
        match self._kind:
            case "builtin":
                return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
            case "hf":
                return self._backend(list(texts), add_special_tokens=False)["input_ids"]
            case _:
                raise AssertionError(self._kind)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`."""
        ids = [int(i) for i in ids]
        match self._kind:
            case "builtin":
                return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
            case "hf":
                return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
            case _:
                raise AssertionError(self._kind)

    def save(self, out_dir: str | Path) -> None:
        """Write Hugging Face-loadable files (tokenizer.json, tokenizer_config.json, special_tokens_map.json).

        `transformers.AutoTokenizer.from_pretrained(out_dir)` then gives the same ids as `encode`, and adds BOS
        with `add_special_tokens=True` exactly when `add_bos` is set.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        match self._kind:
            case "hf":
                self._backend.save_pretrained(str(out))
            case "builtin":
                self._backend.save(str(out / "tokenizer.json"))
                specials = {"bos_token": BUILTIN_BOS, "eos_token": BUILTIN_EOS, "pad_token": BUILTIN_PAD}
                config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 30,
                          "add_bos_token": self.add_bos, "add_eos_token": False,
                          "clean_up_tokenization_spaces": False, **specials}
                (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
                (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
            case _:
                raise AssertionError(self._kind)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[tuple[list[int], bool]]:
        """Tokenize a conversation into (ids, trainable) segments: assistant turns trainable, the rest prompt.

        HF tokenizers use their own chat template (rendered per turn prefix, so the split is exact); the builtin
        tokenizer uses a fixed plain format "<role>: <content>\\n".

        Raises:
            ValueError: a message lacks `role`/`content`, or the HF tokenizer has no chat template.
        """
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        match self._kind:
            case "builtin":
                segments = []
                for m in messages:
                    head = self.encode(f"{m['role']}:")
                    body = self.encode(f" {m['content']}\n")
                    trainable = m["role"] == "assistant"
                    segments += [(head, False), (body + ([self.eos_id] if trainable else []), trainable)]
                return segments
            case "hf":
                if not getattr(self._backend, "chat_template", None):
                    raise ValueError(f"tokenizer {self.name!r} has no chat_template; a `messages` field needs one")
                # Render growing prefixes: the tokens added by message i belong to message i. Exact as long as
                # the template renders a prefix of the conversation as a prefix of the full rendering.
                segments, prev = [], []
                for i, m in enumerate(messages):
                    out = self._backend.apply_chat_template(messages[: i + 1], tokenize=True,
                                                            add_generation_prompt=False)
                    # transformers 5 returns a BatchEncoding, 4.x a list of ids
                    ids = list(out["input_ids"]) if hasattr(out, "keys") else list(out)
                    if ids[: len(prev)] != prev:
                        raise ValueError(f"chat template of {self.name!r} does not render prefixes as prefixes; "
                                         "cannot split prompt and answer tokens exactly")
                    segments.append((ids[len(prev):], m["role"] == "assistant"))
                    prev = ids
                return segments
            case _:
                raise AssertionError(self._kind)


def load_tokenizer(path: str, cache_dir: str | Path | None = None) -> Tokenizer:
    """Load a tokenizer.

    Args:
        path: "builtin" (byte-level BPE of 512 ids trained on the bundled corpus), "builtin:N" (N ids, 300..BUILTIN_MAX_VOCAB)
            or a local Hugging Face tokenizer/model directory (tokenizer.json or sentencepiece files).
        cache_dir: where the builtin tokenizer is cached (default `~/.cache/longtrain`).

    Returns:
        The `Tokenizer`.

    Raises:
        ValueError: the path does not exist, is not a directory with tokenizer files, or "builtin:N" has a bad N.
    """
    if path == "builtin" or path.startswith("builtin:"):
        vocab = BUILTIN_DEFAULT_VOCAB
        if path != "builtin":
            try:
                vocab = int(path.split(":", 1)[1])
            except ValueError:
                raise ValueError(f"tokenizer {path!r}: expected 'builtin' or 'builtin:<vocab size>'") from None
            if not 300 <= vocab <= BUILTIN_MAX_VOCAB:
                raise ValueError(f"tokenizer {path!r}: builtin vocab size must be in 300..{BUILTIN_MAX_VOCAB}, got "
                                 f"{vocab} (the bundled corpus supports {BUILTIN_MAX_VOCAB:,} ids at most; for a "
                                 f"larger vocabulary use a tokenizer directory)")
        return _load_builtin(vocab, Path(cache_dir) if cache_dir else default_cache_dir())
    return _load_hf(path)


def _load_hf(path: str) -> Tokenizer:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"tokenizer path {path!r} does not exist; give a local Hugging Face model/tokenizer "
                         "directory or 'builtin'")
    if not p.is_dir():
        raise ValueError(f"tokenizer path {path!r} is not a directory; give a Hugging Face model/tokenizer "
                         "directory (with tokenizer.json or tokenizer.model) or 'builtin'")
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise ValueError(f"tokenizer directory {path!r} has no tokenizer.json, tokenizer.model, vocab.json or "
                         "tokenizer_config.json")
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # transformers is the `hf` extra
        raise ImportError("loading a Hugging Face tokenizer directory needs `transformers` "
                          "(pip install 'longtrain[hf]')") from e
    hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    if hf.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} defines no eos_token; documents could not be separated")
    # Whether the model expects BOS: ask the tokenizer itself (Llama-3 prepends <|begin_of_text|>, Qwen adds none).
    probe = hf.encode("a", add_special_tokens=True)
    add_bos = hf.bos_token_id is not None and len(probe) > 0 and probe[0] == hf.bos_token_id
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    h = hashlib.sha256(f"hf-{add_bos}-{hf.chat_template}".encode())
    for f in sorted(p.iterdir()):
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")) and f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return Tokenizer(hf, kind="hf", bos_id=hf.bos_token_id, eos_id=hf.eos_token_id, pad_id=pad,
                     vocab_size=len(hf), add_bos=add_bos, name=str(p), fingerprint=h.hexdigest()[:16],
                     chat_template=hf.chat_template)


def _builtin_cache_key(vocab: int) -> str:
    h = hashlib.sha256(f"v{_BUILTIN_VERSION}-vocab{vocab}".encode())
    for f in (TINY_CORPUS, TINY_CHAT):
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _train_builtin(vocab: int):
    from tokenizers import Tokenizer as RawTokenizer, decoders, models, pre_tokenizers, processors, trainers

    from longtrain.data.corpus import read_tiny_corpus

    raw = RawTokenizer(models.BPE())
    # Digits first, one per pre-token, so BPE can never merge them; then the GPT-2 byte-level split.
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BUILTIN_BOS, BUILTIN_EOS, BUILTIN_PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    texts = read_tiny_corpus()
    with open(TINY_CHAT, encoding="utf-8") as f:
        texts += [m["content"] for line in f for m in json.loads(line)["messages"]]
    raw.train_from_iterator(texts, trainer=trainer)
    bos = raw.token_to_id(BUILTIN_BOS)
    # Llama-style: the post-processor prepends BOS when special tokens are requested (HF `add_special_tokens`).
    raw.post_processor = processors.TemplateProcessing(single=f"{BUILTIN_BOS} $A", pair=f"{BUILTIN_BOS} $A $B",
                                                       special_tokens=[(BUILTIN_BOS, bos)])
    return raw


def _load_builtin(vocab: int, cache_dir: Path) -> Tokenizer:
    from tokenizers import Tokenizer as RawTokenizer

    key = f"builtin-{vocab}-{_builtin_cache_key(vocab)}"
    path = cache_dir / "tokenizers" / key / "tokenizer.json"
    if path.exists():
        raw = RawTokenizer.from_file(str(path))
    else:
        raw = _train_builtin(vocab)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Several ranks may train at once: write to a temp file and rename atomically.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        raw.save(tmp)
        os.replace(tmp, path)
    have = raw.get_vocab_size(with_added_tokens=True)
    if have != vocab:  # the corpus changed and supports fewer merges: never a silently smaller vocabulary
        raise ValueError(f"tokenizer 'builtin:{vocab}': the bundled corpus yields {have:,} ids, not {vocab:,}; "
                         f"use builtin:{have} or fewer ids")
    digits = [raw.token_to_id(str(d)) for d in range(10)]
    assert all(i is not None for i in digits), "builtin tokenizer lost a single-digit token"
    return Tokenizer(raw, kind="builtin", bos_id=raw.token_to_id(BUILTIN_BOS), eos_id=raw.token_to_id(BUILTIN_EOS),
                     pad_id=raw.token_to_id(BUILTIN_PAD), vocab_size=raw.get_vocab_size(with_added_tokens=True),
                     add_bos=True, name=f"builtin:{vocab}" if vocab != BUILTIN_DEFAULT_VOCAB else "builtin",
                     fingerprint=key)
