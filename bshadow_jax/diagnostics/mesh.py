"""The device mesh the metric stacks are sharded over, and the padding that makes a stack fit it.

Every stack of same-shape matrices is split along its first (stack) axis over a 1-D mesh; a
stack is padded to a multiple of the device count with copies of its first matrix (never
zeros: no degenerate padding) and the padding is dropped after the computation.
"""
from __future__ import annotations

import math

import jax
import numpy as np


def default_mesh(mesh=None):
    """The mesh to shard stacks over.

    Args:
        mesh: a jax.sharding.Mesh, or None.

    Returns:
        `mesh` when given, else a 1-D mesh ("stack") over all local devices when there are
        several, else None (one device: no sharding).
    """
    if mesh is not None:
        return mesh
    devs = jax.local_devices()
    if len(devs) <= 1:
        return None
    return jax.sharding.Mesh(np.array(devs), ("stack",))


def mesh_size(mesh) -> int:
    """Number of devices in `mesh` (1 for None)."""
    return 1 if mesh is None else int(np.prod(list(mesh.shape.values())))


def stack_sharding(mesh):
    """NamedSharding splitting the first axis over every axis of `mesh`; None without a mesh."""
    if mesh is None:
        return None
    P = jax.sharding.PartitionSpec
    return jax.sharding.NamedSharding(mesh, P(tuple(mesh.axis_names)))


def on_cpu(mesh) -> bool:
    """True when every device of `mesh` (or every local device, for None) is a CPU."""
    devs = mesh.devices.flat if mesh is not None else jax.local_devices()
    return all(d.platform == "cpu" for d in devs)


def padded_size(b: int, mesh) -> int:
    """`b` rounded up to a multiple of the mesh's device count."""
    nd = mesh_size(mesh)
    return int(math.ceil(b / nd) * nd)


def pad(x_BxMxN, n_to: int):
    """`x_BxMxN` extended to `n_to` entries along the stack axis with copies of its first entry."""
    b = x_BxMxN.shape[0]
    if b == n_to:
        return x_BxMxN
    reps = np.repeat(x_BxMxN[:1], n_to - b, axis=0)  # copies, not zeros: no degenerate padding
    return np.concatenate([x_BxMxN, reps], axis=0)


def put(x, mesh):
    """device_put `x`, sharded along its stack axis when a mesh is given."""
    sh = stack_sharding(mesh)
    return jax.device_put(x) if sh is None else jax.device_put(x, sh)


def put_padded(x_BxMxN, n_to: int, mesh):
    """pad() then put(): a host stack as the jitted stack functions take it."""
    return put(pad(x_BxMxN, n_to), mesh)


def over_stack(fn, mesh, sequential: bool):
    """One jitted computation of `fn` over the stack axis, sharded along it when a mesh is given.

    On CPU the per-matrix function runs under lax.map rather than vmap: XLA's CPU runtime
    spreads a batched LAPACK call (QR, SVD, eigh) over its intra-op pool and waits for it, and
    two such calls running concurrently on a 2-thread pool deadlock (seen with jax 0.10.2:
    vmapped QR of (8, 2048, 64) hangs, lax.map does not). Each device then maps over its own
    shard (shard_map), so the stack is still split over the mesh.

    Args:
        fn: per-matrix function of one or more matrices, returning a pytree of arrays.
        mesh: the mesh to shard over, or None.
        sequential: lax.map instead of vmap (pass on_cpu(mesh)).

    Returns:
        The jitted function of the stacked arguments.
    """
    def per_shard(*xs):
        if sequential:
            return jax.lax.map(lambda a: fn(*a), xs)
        return jax.vmap(fn)(*xs)

    if mesh is None:
        return jax.jit(per_shard)
    spec = jax.sharding.PartitionSpec(tuple(mesh.axis_names))
    return jax.jit(jax.shard_map(per_shard, mesh=mesh, in_specs=spec, out_specs=spec))
