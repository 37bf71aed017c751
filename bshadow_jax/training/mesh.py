"""Device mesh (axes data, fsdp, tensor), sharding rules by parameter name, multi-host setup.

Rules follow the Hugging Face layout of the params ([out, in] linear weights):
  q/k/v/gate/up projections and lm_head: rows over `tensor`, columns over `fsdp`;
  embed_tokens: rows (vocab) over `tensor`, width unsplit (a width split would make XLA
  re-layout the batch-sharded activations for the embedding gradient's scatter);
  o_proj/down_proj: rows over `fsdp`, columns over `tensor` (the Megatron pairing);
  biases follow their rows; norms are replicated.
An axis that does not divide a dimension is dropped for that leaf (tiny test models).
The same rules apply to optimizer-state leaves, matched by the parameter path inside them.
"""
from __future__ import annotations

import os
import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bshadow_jax.errors import ConfigError
from bshadow_jax.formats.pytree import path_name
from bshadow_jax.training.config import MeshSection
from bshadow_jax.training.state import TrainState

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

_RULES: tuple[tuple[str, tuple], ...] = (
    (r"embed_tokens\.weight$", ("tensor", None)),  # D unsplit: the gather/scatter stays batch-parallel
    (r"lm_head\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.weight$", ("tensor", "fsdp")),
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.bias$", ("tensor",)),
    (r"(o_proj|down_proj)\.weight$", ("fsdp", "tensor")),
    (r"(o_proj|down_proj)\.bias$", ("fsdp",)),
)


def maybe_initialize_distributed() -> None:
    """Join a multi-host job when the environment describes one (no-op on a single host)."""
    wants = os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("BSHADOW_DISTRIBUTED") == "1"
    if not wants:
        return
    from jax._src import distributed  # the public API has no "already initialized?" query

    if getattr(distributed.global_state, "client", None) is None:
        jax.distributed.initialize()


def make_mesh(cfg: MeshSection, *, batch_size: int | None = None, grad_accum: int = 1) -> Mesh:
    """Mesh over the first data*fsdp*tensor devices; ConfigError when it cannot fit or divide the batch."""
    n_dev = jax.device_count()
    inner = cfg.fsdp * cfg.tensor
    data = cfg.data or max(n_dev // inner, 1)
    total = data * inner
    if total > n_dev:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {data}*{cfg.fsdp}*{cfg.tensor} = {total} exceeds the {n_dev} available devices"
        )
    if jax.process_count() > 1 and total != n_dev:
        raise ConfigError(f"mesh: on several hosts the mesh must use all {n_dev} devices, got {total}")
    if batch_size is not None:
        shards = data * cfg.fsdp
        micro = batch_size // grad_accum
        if micro % shards:
            raise ConfigError(
                f"train.batch_size: micro-batch {micro} (batch_size {batch_size} / grad_accum {grad_accum}) "
                f"is not divisible by mesh.data*mesh.fsdp = {shards}"
            )
    devices = jax.devices()[:total]
    return jax.make_mesh((data, cfg.fsdp, cfg.tensor), AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, axes in _RULES:
        if re.search(pattern, name) and len(axes) == len(shape):
            kept = tuple(a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape))
            return P(*kept)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf of a (possibly abstract) params or optimizer-state tree."""
    def one(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        return NamedSharding(mesh, spec_for(path_name(path), shape, mesh))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch -> global arrays sharded over (data, fsdp) on the batch axis."""
    sharding = batch_sharding(mesh)
    n_proc = jax.process_count()
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * n_proc,) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out


def state_shardings(abstract: TrainState, mesh: Mesh) -> TrainState:
    """Shardings of a train state: params and optimizer moments by the rules, step and RNG replicated."""
    replicated = NamedSharding(mesh, P())
    return TrainState(
        params=tree_shardings(abstract.params, mesh),
        opt_state=tree_shardings(abstract.opt_state, mesh),
        step=replicated,
        rng=replicated,
    )
