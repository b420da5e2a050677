"""The bundled tiny corpus and real offline long documents.

Two sources of text that need no download:

* `tiny_corpus_documents()`: short English documents written and generated for this project (no third-party
  text). `write_tiny_corpus()` produced the bundled `assets/tiny_corpus.jsonl` (text) and
  `assets/tiny_chat.jsonl` (chat `messages`) from a fixed seed; the builtin tokenizer is trained on them.
* `stdlib_documents()`: the Python standard library's own source files (real, long, offline), good for
  perplexity by length and as a real-text corpus in tests.
"""

from __future__ import annotations

import json
import logging
import os
import random
import sysconfig
from pathlib import Path
from typing import Iterator

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_CORPUS = ASSETS / "tiny_corpus.jsonl"
TINY_CHAT = ASSETS / "tiny_chat.jsonl"

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}

# Word lists written for this project.
_NAMES = ["Ada", "Bram", "Cora", "Dev", "Elin", "Farid", "Gita", "Hugo", "Ines", "Jon", "Kira", "Lev", "Mara",
          "Nils", "Oona", "Pavel", "Quin", "Rosa", "Sami", "Tove", "Ugo", "Vera", "Wen", "Xan", "Yara", "Zeno"]
_PLACES = ["a harbour town", "the old mill", "a mountain village", "the river delta", "a busy market",
           "the north station", "a quiet library", "the glass factory", "an island farm", "the city archive",
           "a desert camp", "the forest school", "a canal house", "the weather tower", "a salt marsh"]
_NOUNS = ["lamp", "map", "boat", "garden", "letter", "clock", "bridge", "kettle", "ladder", "window", "engine",
          "basket", "compass", "notebook", "drum", "kite", "wagon", "mirror", "key", "bell", "loom", "anchor",
          "lantern", "orchard", "tunnel", "violin", "telescope", "quilt", "barrel", "fountain"]
_ADJS = ["small", "bright", "old", "heavy", "quiet", "green", "narrow", "warm", "broken", "silver", "patient",
         "careful", "curious", "tired", "clever", "wooden", "distant", "sudden", "gentle", "strange"]
_VERBS = ["repaired", "painted", "carried", "found", "measured", "counted", "opened", "cleaned", "sketched",
          "borrowed", "returned", "weighed", "labelled", "polished", "tested", "described", "moved", "hid"]
_TIMES = ["morning", "evening", "winter", "spring", "market day", "full moon", "holiday", "rainy afternoon"]
_TOPICS = [
    ("attention", "Attention lets every token look back at the tokens before it. The cost grows with the square "
                  "of the sequence length, so long inputs need kernels that never build the full score matrix."),
    ("rotary positions", "Rotary embeddings turn each position into a rotation of pairs of channels. Scaling the "
                         "rotation frequencies lets a model read positions it never saw during pre-training."),
    ("packing", "Packing places several documents in one training sequence. A mask keeps each document from "
                "seeing the others, and the labels at each boundary are ignored."),
    ("checkpoints", "A checkpoint holds the weights, the optimizer state, the data position and every random "
                    "state. Written to a temporary folder and renamed at the end, it is either whole or absent."),
    ("context parallelism", "Context parallelism cuts one long sequence across several devices. Each device "
                            "keeps its queries and passes keys and values around a ring, merging partial results "
                            "with the log-sum-exp."),
    ("loss", "The loss is a sum over valid tokens divided by the number of valid tokens in the global batch. "
             "Averaging per device would give short documents the wrong weight."),
    ("tokenizers", "A byte-level tokenizer can encode any text. Frequent pairs of symbols are merged into new "
                   "symbols until the vocabulary reaches its chosen size."),
    ("evaluation", "A passkey test hides a number in a long text and asks for it at the end. Repeating the test "
                   "at many depths and lengths shows where retrieval starts to fail."),
]


def _story(rng: random.Random) -> str:
    """A short generated story: a few characters, places, objects and numbers."""
    name, friend = rng.sample(_NAMES, 2)
    place = rng.choice(_PLACES)
    sentences = [f"{name} lived in {place}."]
    for _ in range(rng.randint(6, 18)):
        adj, noun, verb, time = rng.choice(_ADJS), rng.choice(_NOUNS), rng.choice(_VERBS), rng.choice(_TIMES)
        n = rng.randint(2, 999)
        sentences.append(rng.choice([
            f"Every {time}, {name} {verb} the {adj} {noun}.",
            f"{friend} said that the {noun} was {adj}, and {name} agreed.",
            f"On the {time} of day {rng.randint(1, 365)}, they {verb} {n} {noun}s near {rng.choice(_PLACES)}.",
            f"The {adj} {noun} weighed {n} grams, which surprised {friend}.",
            f"\"Where is the {noun}?\" asked {friend}. \"Next to the {adj} {rng.choice(_NOUNS)},\" said {name}.",
            f"Nobody knew why the {noun} had been {verb} twice before the {time}.",
            f"{name} wrote {n} in the notebook and drew a {adj} {noun} beside it.",
        ]))
    sentences.append(rng.choice([f"In the end, {name} and {friend} went home.",
                                 f"That was the year of the {rng.choice(_NOUNS)}.",
                                 f"{friend} still keeps the {rng.choice(_NOUNS)} in {rng.choice(_PLACES)}."]))
    return " ".join(sentences)


def _note(rng: random.Random) -> str:
    """A short technical note built from the project's own explanations, with numbers."""
    topic, text = rng.choice(_TOPICS)
    seq = 2 ** rng.randint(10, 17)
    gpus = rng.choice([1, 2, 4, 8, 16, 32, 64])
    lines = [f"Notes on {topic}.", text,
             f"In one run, sequences of {seq} tokens were trained on {gpus} devices for {rng.randint(10, 900)} steps.",
             f"The measured throughput was {rng.randint(1000, 99999)} tokens per second per device."]
    if rng.random() < 0.5:
        lines.append(f"Step {rng.randint(1, 500)}: loss {rng.uniform(1.5, 9.0):.3f}, learning rate "
                     f"{rng.uniform(1e-6, 3e-4):.2e}.")
    return "\n".join(lines)


def _table(rng: random.Random) -> str:
    """A small table of items and numbers (digits matter for passkey-style tasks)."""
    rows = [f"| {rng.choice(_ADJS)} {rng.choice(_NOUNS)} | {rng.randint(0, 99999)} | {rng.randint(1, 60)} |"
            for _ in range(rng.randint(3, 12))]
    return "\n".join(["| item | code | count |", "|---|---|---|", *rows])


def tiny_corpus_documents(n_docs: int = 1000, seed: int = 0) -> list[str]:
    """Generate the project's tiny corpus (deterministic from `seed`).

    Args:
        n_docs: number of documents.
        seed: seed of the generator.

    Returns:
        A list of documents (stories, technical notes and small tables).
    """
    rng = random.Random(seed)
    kinds = [_story] * 6 + [_note] * 3 + [_table]
    return [rng.choice(kinds)(rng) for _ in range(n_docs)]


def tiny_chat_conversations(n_convs: int = 300, seed: int = 1) -> list[list[dict[str, str]]]:
    """Generate short chat conversations (`messages` lists with system/user/assistant roles)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_convs):
        topic, text = rng.choice(_TOPICS)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        msgs = [{"role": "system", "content": "You are a concise assistant."}] if rng.random() < 0.5 else []
        msgs += [{"role": "user", "content": f"Explain {topic} in two sentences."},
                 {"role": "assistant", "content": text}]
        if rng.random() < 0.5:
            msgs += [{"role": "user", "content": f"What is {a} plus {b}?"},
                     {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]
        out.append(msgs)
    return out


def write_tiny_corpus(out_dir: Path = ASSETS) -> None:
    """(Re)write the bundled corpus files; run once by the maintainers, the output is committed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / TINY_CORPUS.name, "w", encoding="utf-8") as f:
        for doc in tiny_corpus_documents():
            f.write(json.dumps({"text": doc}) + "\n")
    with open(out_dir / TINY_CHAT.name, "w", encoding="utf-8") as f:
        for msgs in tiny_chat_conversations():
            f.write(json.dumps({"messages": msgs}) + "\n")


def read_tiny_corpus() -> list[str]:
    """The bundled tiny corpus documents (the `text` field of `assets/tiny_corpus.jsonl`)."""
    with open(TINY_CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def stdlib_documents(min_chars: int = 0, max_docs: int | None = None) -> Iterator[tuple[str, str]]:
    """Yield real long documents that exist offline: the Python standard library's source files.

    Files are read in sorted path order so the sequence is deterministic for one Python installation.

    Args:
        min_chars: skip files shorter than this many characters.
        max_docs: stop after this many documents (None: all).

    Yields:
        (relative path, text) pairs.

    Raises:
        ValueError: the standard library directory cannot be found.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"Python standard library not found at {root}")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # prune third-party packages and the test suites (fixtures, not documents) before descending
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        paths += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    n = 0
    for path in sorted(paths):
        rel = path.relative_to(root)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:  # stdlib sources are UTF-8 (PEP 3120); say so if one is not
            logging.getLogger("longtrain.data").warning("stdlib_documents: skipping %s: not UTF-8 (%s)", path, e)
            continue
        if len(text) < min_chars:
            continue
        yield str(rel), text
        n += 1
        if max_docs is not None and n >= max_docs:
            return


if __name__ == "__main__":
    write_tiny_corpus()
