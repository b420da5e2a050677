"""Checks a run makes before it builds or reads anything expensive (issue 20: fail in the first second, not
after the corpus is tokenized), and warnings about the machine it runs on."""

from __future__ import annotations

import os

from longtrain.model.args import ModelArgs


def check_vocab(tokenizer, args: ModelArgs, source: str) -> None:
    """The tokenizer's ids must index the model's embedding.

    Raises:
        ValueError: the tokenizer has more ids than the model's vocab_size.
    """
    if tokenizer.vocab_size <= args.vocab_size:
        return
    raise ValueError(
        f"{source}: the tokenizer {tokenizer.name} has {tokenizer.vocab_size:,} ids but the model's embedding has "
        f"{args.vocab_size:,} rows (vocab_size), so ids {args.vocab_size:,}..{tokenizer.vocab_size - 1:,} would "
        f"index past it. Use the tokenizer the model was trained with (model.tokenizer), or, for a model.flavor, "
        f"set model.overrides.vocab_size to at least {tokenizer.vocab_size}.")


def oversubscription_warning(local_world: int, threads: int, cores: int | None, load: float = 0.0) -> str | None:
    """A warning when the ranks on this machine, plus what already keeps it busy (the 1-minute load average),
    need more threads than it has cores (CPU only).

    Intra-op threads that outnumber the cores wait on each other at every parallel region: on a busy 2-core
    machine one process with its default threads ran 20x slower than with OMP_NUM_THREADS=1 (issue 20).
    """
    ours = local_world * threads
    if cores is None or threads <= 1 or ours + load <= cores + 0.5:
        return None
    per_rank = max(1, int((cores - load) // local_world))
    busy = f" while other work keeps {load:.1f} of them busy" if ours <= cores + 0.5 else ""
    return (f"warning: {local_world} process(es) x {threads} torch threads = {ours} threads on {cores} CPU "
            f"core(s){busy}: oversubscribed cores can make training many times slower. Set "
            f"OMP_NUM_THREADS={per_rank} (torchrun sets 1 when it starts several processes and it is unset).")


def cpu_thread_warning() -> str | None:
    """oversubscription_warning for this process (cores this process may use, ranks of this machine)."""
    import torch

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return oversubscription_warning(local_world, torch.get_num_threads(), cores, load)
