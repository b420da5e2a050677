"""Checkpoints: torch.distributed.checkpoint (DCP) for model and optimizer, plus per-rank state, written atomically.

Layout of `<run_dir>/checkpoints/`:
    step-N/dcp/            DCP shards of {"model", "optim"} (each rank writes its own)
    step-N/rank-00000.pt   per-rank state: RNGs (python, numpy, torch CPU, CUDA), data-loader position, scheduler
    step-N/meta.json       step, stage, model args (rope included), LoRA settings
    step-N/recipe.yaml     the resolved recipe
    step-N/COMPLETE        written last: only folders holding it are checkpoints
    latest -> step-N       symlink, replaced atomically

Why the dance: DCP writes many files; a kill mid-save leaves a folder that looks like a checkpoint (PITFALLS.md).
Files go to `.tmp-step-N`, COMPLETE is written after every rank finished, then one `rename` publishes the folder.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from longtrain.trainer.distributed import barrier

COMPLETE = "COMPLETE"


def _dcp(fn, state: dict, path: Path) -> None:
    with warnings.catch_warnings():
        # DCP warns that it works "in a single process" when no process group exists: that is the intent.
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=str(path))
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointMeta:
    step: int  # global optimizer steps done
    stage: int  # index of the stage in progress (== len(stages) when all are done)
    stage_step: int  # steps done inside that stage
    model_args: dict  # ModelArgs as a dict, rope included
    lora: dict | None  # LoraConfig as a dict when adapters are present
    tokenizer: str | None  # "builtin" or a directory
    world_size: int


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_write(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, meta: CheckpointMeta, engine, rank_state: dict[str, Any], rank: int,
                    recipe_yaml: str, keep_last: int, debug_pause_s: float = 0.0) -> Path:
    """Write `step-{meta.step}` under `root` on every rank (collective), publish it atomically, prune old ones.

    Args:
        root: the checkpoints folder.
        meta: step / stage / model description (rank 0 writes it).
        engine: the step engine (trainer/engine.py): its `checkpoint_state` goes through DCP (sharded state
            stays sharded), its `save_extra` writes engine files (DeepSpeed's) into the same folder.
        rank_state: this rank's RNGs, loader position, scheduler state (torch.save'd).
        rank: this process's rank.
        recipe_yaml: the resolved recipe text.
        keep_last: complete checkpoints to keep.
        debug_pause_s: test hook, sleep before marking complete (a kill then lands mid-save).
    Returns:
        The published folder.
    """
    root = Path(root)
    final = root / f"step-{meta.step}"
    tmp = root / f".tmp-step-{meta.step}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    barrier()
    _dcp(dcp.save, engine.checkpoint_state(), tmp / "dcp")
    engine.save_extra(tmp)
    torch.save({**rank_state, "rng": rng_state()}, tmp / f"rank-{rank:05d}.pt")
    barrier()
    if rank == 0:
        _fsync_write(tmp / "meta.json", json.dumps(meta.__dict__, indent=1))
        _fsync_write(tmp / "recipe.yaml", recipe_yaml)
        if debug_pause_s:
            time.sleep(debug_pause_s)
        _fsync_write(tmp / COMPLETE, f"{time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        if final.exists():  # the same step saved again (e.g. SIGTERM right after a periodic save)
            shutil.rmtree(final)
        os.replace(tmp, final)
        link = root / ".latest.tmp"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(final.name)
        os.replace(link, root / "latest")
        for old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old)
    barrier()
    return final


def complete_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoint folders under `root`, oldest first (partial `.tmp-*` folders are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / COMPLETE).is_file()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from `path`: a step-N folder, the `latest` link, or a checkpoints root (newest).

    Raises:
        ValueError: nothing complete is there.
    """
    path = Path(path)
    if (path / COMPLETE).is_file():
        return path.resolve()
    found = complete_checkpoints(path)
    if found:
        return found[-1]
    partial = f" ({path} has no {COMPLETE} marker: a save was interrupted)" if path.is_dir() else ""
    raise ValueError(f"no complete checkpoint at {path}{partial}; expected a step-N folder holding {COMPLETE}, "
                     f"a `latest` link, or a checkpoints folder containing such step-N folders")


def read_meta(ckpt: str | Path) -> CheckpointMeta:
    return CheckpointMeta(**json.loads((Path(ckpt) / "meta.json").read_text()))


def load_checkpoint(ckpt: str | Path, engine, rank: int) -> tuple[CheckpointMeta, dict[str, Any]]:
    """Load model, optimizer (through the step engine) and this rank's state (RNGs restored) from a complete
    checkpoint (collective).

    Returns:
        The meta and this rank's state (loader position, scheduler state, counters).
    Raises:
        ValueError: incomplete checkpoint, or saved with another world size (the per-rank state would not match).
    """
    ckpt = resolve_checkpoint(ckpt)
    meta = read_meta(ckpt)
    rank_file = ckpt / f"rank-{rank:05d}.pt"
    if not rank_file.is_file():
        raise ValueError(f"{ckpt} was saved by {meta.world_size} ranks and holds no state for rank {rank}; "
                         f"resume with the same world size")
    state = engine.checkpoint_state()
    _dcp(dcp.load, state, ckpt / "dcp")
    engine.load_checkpoint_state(state, ckpt)
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return meta, rank_state


def load_model_weights(ckpt: str | Path, model: torch.nn.Module) -> CheckpointMeta:
    """Load only the model weights of a checkpoint (export, eval), in one process."""
    ckpt = resolve_checkpoint(ckpt)
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    _dcp(dcp.load, state, ckpt / "dcp")
    set_model_state_dict(model, state["model"])
    return read_meta(ckpt)
