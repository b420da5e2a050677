"""Offload of saved activations to (pinned) host memory, with a host-RAM budget that fails early.

`ActivationOffloader.hooks()` is a `torch.autograd.graph.saved_tensors_hooks` context: every tensor
autograd saves inside it is copied to host memory when saved (pack) and copied back when backward needs it
(unpack). On CUDA the copy goes to pinned memory on a side stream so it overlaps the next layer's compute
(the GPU tensor is kept alive for the side stream with `record_stream`); unpack waits for that copy and
moves the tensor back with a non-blocking copy. On CPU-only machines the same path runs with plain CPU
copies, so tests exercise the bookkeeping and the budget check.

Parameters (leaf tensors that require grad, and views of them) are never offloaded: they are not
activations and must not be duplicated on the host. Tensors saved several times (the RoPE cos/sin every
layer saves) are offloaded once.
"""

from __future__ import annotations

import os
import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

GIB = 1024**3


class HostBudgetError(ValueError):
    """Activation offload would exceed the host-RAM budget."""


def host_memory_available() -> int:
    """Bytes of host RAM available now (Linux MemAvailable; total physical memory elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _is_parameter_like(t: Tensor) -> bool:
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


class _Packed:
    """A saved tensor moved to the host (or left in place when too small / a parameter)."""

    __slots__ = ("host", "device", "event", "__weakref__")

    def __init__(self, host: Tensor, device: torch.device, event: "torch.cuda.Event | None"):
        self.host, self.device, self.event = host, device, event


class ActivationOffloader:
    """Moves saved activations to host memory within a byte budget.

    Args:
        host_budget_bytes: most host bytes the offloaded activations may hold at once; None = 90% of the
            host RAM available when the offloader is built.
        min_bytes: tensors smaller than this stay where they are (bookkeeping costs more than it saves).

    Raises:
        HostBudgetError: the budget asks for more host RAM than is available.
    """

    def __init__(self, host_budget_bytes: int | None = None, min_bytes: int = 1 << 20):
        available = host_memory_available()
        if host_budget_bytes is None:
            host_budget_bytes = int(0.9 * available)
        if host_budget_bytes <= 0:
            raise HostBudgetError(f"host_budget_bytes must be > 0, got {host_budget_bytes}")
        if host_budget_bytes > available:
            raise HostBudgetError(
                f"activation offload: host_budget_bytes = {host_budget_bytes / GIB:.2f} GiB but only "
                f"{available / GIB:.2f} GiB of host RAM is available; lower the budget, free host memory, "
                f"or turn offload off (memory.offload_activations=false)")
        self.budget = host_budget_bytes
        self.min_bytes = min_bytes
        self.live_bytes = 0  # host bytes held by packed tensors not yet freed
        self.peak_bytes = 0
        self._stream = torch.cuda.Stream() if torch.cuda.is_available() else None
        self._dedup: dict[tuple, tuple[weakref.ref, weakref.ref]] = {}

    def check(self, needed_bytes: int, what: str) -> None:
        """Fail before offloading `needed_bytes` more would exceed the budget.

        Raises:
            HostBudgetError: with needed vs available bytes and the switches that reduce them.
        """
        if self.live_bytes + needed_bytes > self.budget:
            raise HostBudgetError(
                f"activation offload needs {(self.live_bytes + needed_bytes) / GIB:.2f} GiB of host RAM "
                f"({what}) but the budget is {self.budget / GIB:.2f} GiB (host RAM available now: "
                f"{host_memory_available() / GIB:.2f} GiB). Shorten train.seq_len / micro_batch, raise "
                f"host_budget_bytes, use memory.chunkwise, or set memory.offload_activations=false")

    def _release(self, nbytes: int) -> None:
        self.live_bytes -= nbytes

    def _pack(self, t: Tensor) -> _Packed | Tensor:
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or _is_parameter_like(t):
            return t
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()),
               t._version, t.dtype, t.device)
        hit = self._dedup.get(key)
        # A hit counts only while the original tensor is alive: once it is freed its address may be reused.
        if hit is not None and hit[0]() is not None and hit[1]() is not None:
            return hit[1]()
        self.check(nbytes, f"a saved {tuple(t.shape)} {t.dtype} activation")
        if t.device.type == "cuda":
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self._stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self._stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            t.record_stream(self._stream)  # the caching allocator must not reuse t before the copy ends
            packed = _Packed(host, t.device, event)
        else:
            packed = _Packed(t.detach().clone(), t.device, None)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        weakref.finalize(packed, self._release, nbytes)
        self._dedup[key] = (weakref.ref(t), weakref.ref(packed))
        return packed

    @staticmethod
    def _unpack(packed: _Packed | Tensor) -> Tensor:
        if isinstance(packed, Tensor):
            return packed
        if packed.device.type == "cuda":
            torch.cuda.current_stream(packed.device).wait_event(packed.event)
            return packed.host.to(packed.device, non_blocking=True)
        return packed.host

    @contextmanager
    def hooks(self) -> Iterator[None]:
        """Offload every tensor autograd saves inside this context."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        # Drop dead dedup entries so the dict does not grow across steps.
        self._dedup = {k: r for k, r in self._dedup.items() if r[0]() is not None and r[1]() is not None}
