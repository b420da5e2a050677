"""Run a function on N gloo ranks in fresh processes (torch.multiprocessing spawn) for distributed tests."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)  # 2 cores shared by all ranks
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, *args) -> None:
    """Call fn(rank, world, *args) on `world` gloo ranks; an exception on any rank fails the caller.

    `fn` must be a module-level function (it is pickled by name into the spawned processes).
    """
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
