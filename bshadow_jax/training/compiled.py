"""The jitted train program for one (model, optimizer, mesh): sharded init and the donated train step.

    prog = compile_train_step(model_cfg, cfg.optim, steps=cfg.train.steps, mesh=mesh)
    state = prog.init_random(jax.random.key(seed), seed)      # sharded by the mesh's rules
    state, metrics = prog.step_fn(state, batch)               # batch: dict over data.pipeline.BATCH_KEYS

`bshadow train`, the studies, the benchmarks and the tests all build their step here, so what
is measured is what runs. Shardings come from `jax.eval_shape` of the init, nanodo-style.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from bshadow_jax.data.pipeline import BATCH_KEYS
from bshadow_jax.models.llama import LlamaConfig, init_params
from bshadow_jax.training import mesh as mesh_lib
from bshadow_jax.training.config import OptimSection
from bshadow_jax.training.optim import make_optimizer
from bshadow_jax.training.state import TrainState, init_state
from bshadow_jax.training.step import make_train_step, remat_compiler_options


class CompiledStep(NamedTuple):
    """Jitted functions of one train program, and the state layout they agree on.

    Attributes:
      abstract: the train state as ShapeDtypeStructs (what a checkpoint restores onto).
      shardings: the train state's shardings on the mesh.
      step_fn: (state, batch) -> (state, metrics); donates the state.
      init_random: (key, seed) -> a freshly initialised state.
      init_from_params: (params, seed) -> a state starting from given (e.g. pretrained) params.
    """

    abstract: TrainState
    shardings: TrainState
    step_fn: Callable
    init_random: Callable
    init_from_params: Callable


@functools.lru_cache(maxsize=8)
def compile_train_step(model_cfg: LlamaConfig, optim_cfg: OptimSection, *, steps: int, mesh: jax.sharding.Mesh,
                       compute_dtype: str = "float32", grad_accum: int = 1, remat: str = "none") -> CompiledStep:
    """Jitted init and train step, cached across calls with the same shapes and settings.

    Studies run many arms and seeds in one process; seeds and data are arguments, not constants,
    so one compile serves them all.

    Args:
      model_cfg: the decoder's config.
      optim_cfg: the optimizer section (its schedule needs `steps`).
      steps: total optimizer steps of the run (the learning-rate schedule's length).
      mesh: the device mesh; params and optimizer state are sharded by `mesh.tree_shardings`.
      compute_dtype: "float32" or "bfloat16" for the forward and backward; master weights stay float32.
      grad_accum: micro-batches accumulated inside one step.
      remat: "none", "dots" or "full" activation recomputation per decoder layer.

    Returns:
      A CompiledStep.
    """
    tx, schedule = make_optimizer(optim_cfg, steps)

    def from_params(params, seed):
        return init_state(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params), tx, seed)

    def from_key(key, seed):
        return init_state(init_params(model_cfg, key), tx, seed)

    abstract = jax.eval_shape(from_key, jax.random.key(0), 0)
    shardings = mesh_lib.state_shardings(abstract, mesh)
    batch_shardings = {k: mesh_lib.batch_sharding(mesh) for k in BATCH_KEYS}
    step_fn = jax.jit(
        make_train_step(model_cfg, tx, schedule, compute_dtype=compute_dtype, grad_accum=grad_accum, remat=remat),
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, None),
        donate_argnums=0,
        compiler_options=remat_compiler_options(remat, mesh.devices.flat[0].platform),
    )
    return CompiledStep(
        abstract=abstract,
        shardings=shardings,
        step_fn=step_fn,
        init_random=jax.jit(from_key, out_shardings=shardings, static_argnums=1),
        init_from_params=jax.jit(from_params, out_shardings=shardings, static_argnums=1),
    )
