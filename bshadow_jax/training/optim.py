"""The optax recipe: clip -> optimizer with a warmup + decay schedule and a weight-decay mask.

The optimizer is a config choice (`optim.name`) because studies use an optimizer-change
control arm; every choice shares the same schedule, clipping and decay mask.
"""
from __future__ import annotations

import jax
import optax

from bshadow_jax.formats.pytree import path_name
from bshadow_jax.training.config import OptimSection


def make_schedule(cfg: OptimSection, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, max(total_steps - warmup, 1))
    else:
        decay = optax.cosine_decay_schedule(cfg.lr, max(total_steps - warmup, 1), alpha=cfg.min_lr_ratio)
    if warmup == 0:
        return decay
    # step 0 trains with lr/warmup, not 0: a zero first step is wasted compute.
    ramp = optax.linear_schedule(cfg.lr / (warmup + 1), cfg.lr, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def decay_mask(params, *, decay_embeddings: bool = False):
    """True for leaves that get weight decay: matrices, not norms or biases (1-D), not embeddings unless asked."""
    def keep(path, leaf) -> bool:
        if leaf.ndim < 2:
            return False
        return decay_embeddings or "embed_tokens" not in path_name(path)

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    mask = lambda params: decay_mask(params, decay_embeddings=cfg.decay_embeddings)  # noqa: E731
    if cfg.name == "adamw":
        opt = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name == "lion":
        opt = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
    elif cfg.name in ("sgd", "sgd_momentum"):
        momentum = cfg.b1 if cfg.name == "sgd_momentum" else None
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay, mask), optax.sgd(schedule, momentum=momentum))
    elif cfg.name == "adafactor":
        opt = optax.adafactor(schedule, weight_decay_rate=cfg.weight_decay or None, weight_decay_mask=mask)
    else:  # pragma: no cover - the config Literal refuses other names
        raise ValueError(cfg.name)
    if cfg.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
    return opt, schedule
