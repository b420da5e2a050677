"""Parallel degrees and the device mesh: one place that validates the layout and names the mesh dims.

World = dp_replicate x dp_shard x cp, and cp = ring x ulysses (USP 2D context parallelism,
Fang & Zhao 2024, arXiv:2405.07719). Mesh dims, outermost first:

    dp_replicate   HSDP replicas (gradients all-reduced between them)
    dp_shard       FSDP / ZeRO shards
    ring           ring (or all-gather) context parallelism across Ulysses groups
    ulysses        Ulysses all-to-all inside a group (innermost: the fastest links)

Flattened dims built on top: `cp` = (ring, ulysses), `dp_shard_cp` = (dp_shard, ring, ulysses) which
FSDP shards over (cp ranks hold different tokens of one sequence: their gradients of replicated
parameters must be summed, and sharding over dp_shard x cp does exactly that), and `dp` =
(dp_replicate, dp_shard), the ranks that read different data.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

CP_LAYOUTS = ("zigzag", "contiguous", "balanced", "auto")  # cp_shard.py, cp_balance.py


@dataclass
class ParallelDims:
    """Parallel degrees. `dp_shard=-1` takes whatever the world leaves after dp_replicate and cp.

    Raises:
        ValueError: a degree is < 1 (or < -1 for dp_shard), cp is not a multiple of ulysses, or the
            product of the degrees is not the world size.
    """

    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1  # total context-parallel degree = ring x ulysses
    ulysses: int = 1  # Ulysses degree inside cp; cp // ulysses ranks form the ring
    world_size: int = 1

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "cp", "ulysses", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name}={getattr(self, name)} must be >= 1")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"dp_shard={self.dp_shard} must be >= 1, or -1 to use the ranks the other degrees leave")
        if self.cp % self.ulysses:
            raise ValueError(f"cp={self.cp} must be a multiple of ulysses={self.ulysses} (cp = ring x ulysses); "
                             f"valid ulysses degrees for cp={self.cp}: "
                             f"{[d for d in range(1, self.cp + 1) if self.cp % d == 0]}")
        rest = self.dp_replicate * self.cp
        if self.dp_shard == -1:
            if self.world_size % rest:
                raise ValueError(f"world size {self.world_size} is not divisible by dp_replicate x cp = "
                                 f"{self.dp_replicate} x {self.cp} = {rest}; change cp or dp_replicate, or the "
                                 f"number of processes")
            self.dp_shard = self.world_size // rest
        total = self.dp_replicate * self.dp_shard * self.cp
        if total != self.world_size:
            raise ValueError(f"dp_replicate x dp_shard x cp = {self.dp_replicate} x {self.dp_shard} x {self.cp} = "
                             f"{total} != world size {self.world_size}; set dp_shard=-1 to fill the world, or "
                             f"launch {total} processes")

    @property
    def ring(self) -> int:
        """Ranks in the ring (or all-gather) stage of context parallelism."""
        return self.cp // self.ulysses

    @property
    def dp(self) -> int:
        """Ranks that read different data."""
        return self.dp_replicate * self.dp_shard

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the DeviceMesh over all ranks (the default process group must be initialised).

        Args:
            device_type: "cpu", "cuda", ... (the process group backend follows from it: gloo, NCCL).

        Returns:
            A mesh with dims (dp_replicate, dp_shard, ring, ulysses) and flattened dims `cp`,
            `dp_shard_cp` and `dp`.
        """
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.ring, self.ulysses),
                                mesh_dim_names=("dp_replicate", "dp_shard", "ring", "ulysses"))
        # cp rank = ring_rank * ulysses + ulysses_rank: prepare_cp_inputs relies on this order.
        # torch asks callers to keep the flattened meshes themselves (slicing them from the root is
        # deprecated): `submesh` finds them here.
        _FLATTENED[id(mesh)] = (mesh, {
            "cp": mesh["ring", "ulysses"]._flatten("cp"),
            "dp_shard_cp": mesh["dp_shard", "ring", "ulysses"]._flatten("dp_shard_cp"),
            "dp": mesh["dp_replicate", "dp_shard"]._flatten("dp"),
        })
        return mesh


# id(root mesh) -> (root mesh, flattened sub-meshes); the root is kept alive with its sub-meshes.
_FLATTENED: dict[int, tuple[DeviceMesh, dict[str, DeviceMesh]]] = {}


def submesh(mesh: DeviceMesh, name: str) -> DeviceMesh:
    """The 1-D sub-mesh `name` of a mesh from ParallelDims.build_mesh: a dim or a flattened dim.

    Args:
        mesh: a root mesh from build_mesh, or a 1-D mesh named `name`.
        name: dp_replicate, dp_shard, ring, ulysses, cp, dp_shard_cp or dp.

    Returns:
        The 1-D DeviceMesh.

    Raises:
        ValueError: `name` is neither a dim of `mesh` nor one flattened by build_mesh.
    """
    names = mesh.mesh_dim_names or ()
    if names == (name,):
        return mesh
    if name in names:
        return mesh[name]
    if id(mesh) in _FLATTENED and _FLATTENED[id(mesh)][0] is mesh and name in _FLATTENED[id(mesh)][1]:
        return _FLATTENED[id(mesh)][1][name]
    raise ValueError(f"mesh {mesh} has no dim {name!r}; build it with ParallelDims.build_mesh "
                     f"(dims dp_replicate, dp_shard, ring, ulysses; flattened cp, dp_shard_cp, dp)")


def padded_seq_len(seq_len: int, cp: int, layout: str) -> int:
    """Length after context-parallel padding: a multiple of 2*cp (zigzag, auto) or cp (contiguous, balanced).

    Raises:
        ValueError: unknown layout.
    """
    match layout:
        case "zigzag" | "auto":
            multiple = 2 * cp
        case "contiguous" | "balanced":
            multiple = cp
        case _:
            raise ValueError(f"unknown cp layout {layout!r}; valid: {', '.join(CP_LAYOUTS)}")
    return -(-seq_len // multiple) * multiple


def validate_seq_len(seq_len: int, cp: int, mode: str) -> int:
    """Check that a sequence of `seq_len` tokens can be sharded over `cp` ranks with `mode` layout.

    Lengths that are not multiples of 2*cp (zigzag, auto) or cp (contiguous, balanced) are fine: prepare_cp_inputs pads
    them with an ignored padding document. Each rank must hold at least one real token per chunk, though.

    Args:
        seq_len: tokens per sequence before sharding.
        cp: context-parallel degree.
        mode: the cp layout, one of CP_LAYOUTS.

    Returns:
        The padded length.

    Raises:
        ValueError: seq_len or cp < 1, unknown mode, or fewer tokens than chunks.
    """
    if cp < 1:
        raise ValueError(f"cp={cp} must be >= 1")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    padded = padded_seq_len(seq_len, cp, mode)
    chunks = padded_seq_len(1, cp, mode)  # tokens of the smallest cut: 2*cp chunks (zigzag) or cp
    if seq_len < chunks:
        raise ValueError(f"seq_len={seq_len} is shorter than the {chunks} chunks the {mode} layout cuts for cp={cp}; "
                         f"use seq_len >= {chunks} or a smaller cp")
    return padded
