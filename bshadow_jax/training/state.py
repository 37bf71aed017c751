"""Train state: a plain pytree of params, optimizer state, step and RNG key data."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array      # int32 scalar: updates applied so far
    rng: jax.Array       # uint32[2] raw key data (orbax saves it like any array)


def init_state(params, tx, seed: int) -> TrainState:
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng)
