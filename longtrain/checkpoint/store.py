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
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict


COMPLETE = "COMPLETE"


def barrier() -> None:
    """Every rank reaches this line before any goes on (nothing in a single process)."""
    if dist.is_initialized():
        dist.barrier()


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


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model than the one built (other tensors or shapes)."""


def _some(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def check_model_keys(ckpt: Path, model_sd: dict, meta: CheckpointMeta) -> None:
    """The model's tensors against the checkpoint's index, in one sentence (instead of DCP's per-key
    `Missing key in checkpoint state_dict`, raised deep inside a collective load on every rank).

    Raises:
        CheckpointMismatch: tensors missing on either side or of another shape.
    """
    md = dcp.FileSystemReader(str(ckpt / "dcp")).read_metadata()
    saved = {k[len("model."):]: v for k, v in md.state_dict_metadata.items() if k.startswith("model.")}
    missing = sorted(k for k in model_sd if k not in saved)
    extra = sorted(k for k in saved if k not in model_sd)
    shapes = sorted(f"{k} (checkpoint {tuple(saved[k].size)}, model {tuple(v.shape)})" for k, v in model_sd.items()
                    if k in saved and hasattr(saved[k], "size") and tuple(saved[k].size) != tuple(v.shape))
    if not (missing or extra or shapes):
        return
    parts = ([f"{len(missing)} of the model's tensors are not in it ({_some(missing)})"] if missing else []) \
        + ([f"it holds {len(extra)} tensors the model lacks ({_some(extra)})"] if extra else []) \
        + ([f"{len(shapes)} differ in shape ({_some(shapes, 2)})"] if shapes else [])
    shape_keys = ("architecture", "vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                  "intermediate_size")
    saved_args = ", ".join(f"{k}={meta.model_args[k]}" for k in shape_keys if k in meta.model_args)
    raise CheckpointMismatch(
        f"checkpoint {ckpt} holds another model than the one built: {'; '.join(parts)}. It was saved from a "
        f"model with {saved_args}{' with LoRA ' + str(meta.lora) if meta.lora else ''}; build that model (the checkpoint's "
        f"recipe.yaml has its model section) or resume from a checkpoint of this model.")


class CheckpointDamaged(ValueError):
    """A checkpoint marked complete whose files are missing, truncated or unreadable."""


def checkpoint_problem(ckpt: str | Path) -> str | None:
    """What is wrong with the files of a checkpoint marked complete, or None when they are intact.

    A disk that filled up, a copy cut short or a bad sector leave a folder that holds COMPLETE and still cannot
    be loaded (issue 20). Checked: meta.json parses, recipe.yaml parses, every rank file loads, the DCP index
    loads and every shard holds the bytes the index points at (a truncated shard is shorter than its index says).
    """
    ckpt = Path(ckpt)
    meta_path = ckpt / "meta.json"
    try:
        meta = read_meta(ckpt)
    except FileNotFoundError:
        return f"{meta_path} is missing"
    except (ValueError, TypeError) as e:  # JSONDecodeError / UnicodeDecodeError are ValueErrors
        return f"{meta_path} is damaged (not the expected JSON: {e})"
    if (ckpt / "recipe.yaml").is_file():
        try:
            yaml.safe_load((ckpt / "recipe.yaml").read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            return f"{ckpt / 'recipe.yaml'} is damaged (not valid YAML: {str(e).splitlines()[0]})"
    for rank in range(meta.world_size):
        rank_file = ckpt / f"rank-{rank:05d}.pt"
        if not rank_file.is_file():
            return f"{rank_file} is missing (the checkpoint was saved by {meta.world_size} ranks)"
        try:
            torch.load(rank_file, weights_only=False)
        except Exception as e:  # a truncated zip, a bad pickle: anything torch.load raises
            return f"{rank_file} cannot be read, it is truncated or damaged ({type(e).__name__}: {e})"
    return _dcp_problem(ckpt / "dcp")


def _dcp_problem(dcp_dir: Path) -> str | None:
    try:
        md = dcp.FileSystemReader(str(dcp_dir)).read_metadata()
    except Exception as e:
        return f"{dcp_dir / '.metadata'} cannot be read, it is missing, truncated or damaged ({type(e).__name__})"
    need: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        shard = dcp_dir / rel
        if not shard.is_file():
            return f"{shard} is missing (the index {dcp_dir / '.metadata'} refers to it)"
        have = shard.stat().st_size
        if have < size:
            return f"{shard} is truncated: {have:,} bytes, its index says at least {size:,}"
    return None


def newest_intact(root: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under `root` whose files are intact, and the damaged newer ones
    (each with what is wrong), newest first."""
    damaged = []
    for ckpt in reversed(complete_checkpoints(root)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, damaged
        damaged.append((ckpt, problem))
    return None, damaged


def verified_checkpoint(path: str | Path) -> Path:
    """resolve_checkpoint, then check its files (export, eval, an explicit train.resume path).

    Raises:
        ValueError: nothing complete there (resolve_checkpoint).
        CheckpointDamaged: its files are damaged; the message names the file and the newest intact checkpoint.
    """
    ckpt = resolve_checkpoint(path)
    problem = checkpoint_problem(ckpt)
    if problem is None:
        return ckpt
    intact, _ = newest_intact(ckpt.parent)
    alt = (f"the newest intact checkpoint there is {intact}; use it instead" if intact is not None
           else f"no intact checkpoint is left in {ckpt.parent}")
    raise CheckpointDamaged(f"checkpoint {ckpt} is damaged: {problem}. {alt[0].upper() + alt[1:]}.")


def load_checkpoint(ckpt: str | Path, engine, rank: int, any_rank: bool = False,
                    ) -> tuple[CheckpointMeta, dict[str, Any]]:
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
    if any_rank and not rank_file.is_file():  # another layout: RNGs and counters of rank 0, data remapped after
        rank_file = ckpt / "rank-00000.pt"
    if not rank_file.is_file():
        raise ValueError(f"{ckpt} was saved by {meta.world_size} ranks and holds no state for rank {rank}; "
                         f"resume with the same world size")
    state = engine.checkpoint_state()
    check_model_keys(ckpt, state["model"], meta)
    _dcp(dcp.load, state, ckpt / "dcp")
    engine.load_checkpoint_state(state, ckpt)
    rank_state = torch.load(rank_file, weights_only=False)
    set_rng_state(rank_state.pop("rng"))
    return meta, rank_state


def load_model_weights(ckpt: str | Path, model: torch.nn.Module) -> CheckpointMeta:
    """Load only the model weights of a checkpoint (export, eval), in one process."""
    ckpt = resolve_checkpoint(ckpt)
    state = {"model": get_model_state_dict(model, options=StateDictOptions())}
    check_model_keys(ckpt, state["model"], read_meta(ckpt))
    _dcp(dcp.load, state, ckpt / "dcp")
    set_model_state_dict(model, state["model"])
    return read_meta(ckpt)
