"""Pure train and eval steps.

The loss is the masked mean cross-entropy over all `loss_mask` tokens of the global batch.
Gradient accumulation scans over micro-batches inside the step and sums per-token losses
before dividing by the global token count, so `grad_accum=k` computes the same update as
one big batch (up to float rounding) and a resumed run replays the exact same program.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from bshadow_jax.models.llama import forward
from bshadow_jax.training.state import TrainState

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _forward(model_cfg, params, batch, compute_dtype, remat="none"):
    return forward(
        model_cfg, params, batch["inputs"], batch["segment_ids"], batch["positions"],
        compute_dtype=_DTYPES.get(compute_dtype, compute_dtype), remat=remat,
    )


def loss_sums(params, batch: dict, *, model_cfg, compute_dtype="float32", remat="none") -> tuple[jax.Array, jax.Array]:
    """(sum of masked per-token cross-entropy, number of loss tokens), both float32."""
    logits_BxTxV = _forward(model_cfg, params, batch, compute_dtype, remat).astype(jnp.float32)
    ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["targets"])
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(ce_BxT * mask_BxT), jnp.sum(mask_BxT)


def _split_micro(x, n: int):
    # Row i of micro-batch j is global row i*n + j: every device's contiguous shard of the
    # batch axis holds rows of every micro-batch, so each micro-step stays data-parallel.
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)


def grads_and_sums(params, batch: dict, *, model_cfg, compute_dtype="float32", grad_accum: int = 1, remat="none"):
    """Gradient of the summed loss, the summed loss and the token count over all micro-batches."""
    grad_fn = jax.value_and_grad(
        lambda p, b: loss_sums(p, b, model_cfg=model_cfg, compute_dtype=compute_dtype, remat=remat), has_aux=True
    )
    if grad_accum == 1:
        (loss_sum, count), grads = grad_fn(params, batch)
        return grads, loss_sum, count
    micro = jax.tree.map(lambda x: _split_micro(x, grad_accum), batch)

    def body(carry, mb):
        g_acc, l_acc, c_acc = carry
        (l, c), g = grad_fn(params, mb)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + l, c_acc + c), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    (grads, loss_sum, count), _ = jax.lax.scan(body, (zeros, jnp.float32(0), jnp.float32(0)), micro)
    return grads, loss_sum, count


def train_step(
    state: TrainState, batch: dict, *, model_cfg, tx: optax.GradientTransformation, schedule=None,
    compute_dtype="float32", grad_accum: int = 1, remat="none",
) -> tuple[TrainState, dict[str, Any]]:
    grads_sum, loss_sum, count = grads_and_sums(
        state.params, batch, model_cfg=model_cfg, compute_dtype=compute_dtype, grad_accum=grad_accum, remat=remat
    )
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(jnp.float32), grads_sum)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step))
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step) if schedule is not None else jnp.float32(jnp.nan),
        "tokens": count,
    }
    return TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng), metrics


def eval_step(params, batch: dict, *, model_cfg, compute_dtype="float32") -> dict[str, jax.Array]:
    loss_sum, count = loss_sums(params, batch, model_cfg=model_cfg, compute_dtype=compute_dtype)
    return {"loss_sum": loss_sum, "tokens": count}


def make_train_step(model_cfg, tx, schedule, *, compute_dtype="float32", grad_accum: int = 1, remat="none"):
    return functools.partial(
        train_step, model_cfg=model_cfg, tx=tx, schedule=schedule, compute_dtype=compute_dtype,
        grad_accum=grad_accum, remat=remat,
    )


def remat_compiler_options(remat: str, platform: str) -> dict[str, str]:
    """XLA options for a train step compiled with `remat` on `platform`.

    XLA:CPU's default scheduler orders ops for concurrency and ignores memory, so it can run the
    recomputation early and keep its activations anyway: a 4-layer test model's gradient needed
    36 MB of temporaries with or without remat. The memory-optimised scheduler makes the saving
    real (22 MB without remat, 13 MB with). GPU and TPU schedulers already track memory.
    """
    if remat != "none" and platform == "cpu":
        return {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
    return {}


def make_eval_step(model_cfg, *, compute_dtype="float32"):
    return functools.partial(eval_step, model_cfg=model_cfg, compute_dtype=compute_dtype)
