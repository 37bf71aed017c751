"""Orbax checkpoints as read-only weight stores: run folders, step folders and their `params` item.

A bshadow run folder is RUN/config.yaml + RUN/checkpoints/<step>/{params,train,data}; `params`
is its own item so that readers restore only the weights, one tensor at a time if need be.
Nothing here knows about training: the writer (`training.checkpoint`) uses these names.
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bshadow_jax.config import read_yaml
from bshadow_jax.errors import UserError
from bshadow_jax.formats.pytree import key_name, unflatten

CKPT_DIRNAME = "checkpoints"
CONFIG_NAME = "config.yaml"
TOKENIZER_DIRNAME = "tokenizer"


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit() and (p / "params").is_dir()


def resolve_step_dir(path: str | os.PathLike) -> tuple[Path, Path]:
    """(step folder, run folder) for a run folder (latest step) or an orbax step folder."""
    p = Path(path)
    if _is_step_dir(p):
        return p, p.parent.parent
    ckpts = p / CKPT_DIRNAME
    if ckpts.is_dir():
        steps = sorted((int(c.name) for c in ckpts.iterdir() if _is_step_dir(c)))
        if not steps:
            raise UserError(f"{p}: run folder has no finished checkpoint in {CKPT_DIRNAME}/")
        return ckpts / str(steps[-1]), p
    raise UserError(f"{p}: not a bshadow run folder (no {CKPT_DIRNAME}/) nor an orbax step folder")


def load_params_numpy(step_dir: str | os.PathLike) -> dict:
    """The `params` item of a step folder as a host numpy pytree, whatever mesh saved it."""
    leaves = ParamsLeaves(step_dir)
    try:
        return unflatten(leaves.read_many(leaves.names()))
    finally:
        leaves.close()


class ParamsLeaves:
    """The `params` item of a step folder, one leaf at a time (for checkpoints larger than memory).

    Shapes and dtypes come from orbax's metadata. `read_many` restores only the leaves asked for,
    as host numpy arrays, through one partial restore, whatever mesh saved them. Leaves are
    named by their dotted key path ("model.layers.0.mlp.up_proj.weight"), as
    `models.flatten_params` names them.
    """

    def __init__(self, step_dir: str | os.PathLike):
        self.item = Path(step_dir).absolute() / "params"
        # the handler, not a Checkpointer: one warns on every call that an item folder has no step metadata
        self._handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = self._handler.metadata(self.item)
        except Exception as e:  # noqa: BLE001 - any orbax/tensorstore failure here means an unreadable item
            raise UserError(f"{self.item}: cannot read the orbax params checkpoint ({type(e).__name__}: {e})") from None
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        self._leaves = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            keys = tuple(key_name(k) for k in key_path)
            self._leaves[".".join(keys)] = (keys, tuple(int(d) for d in leaf.shape), np.dtype(leaf.dtype))

    def names(self) -> list[str]:
        return list(self._leaves)

    def __contains__(self, name: str) -> bool:
        return name in self._leaves

    def shape(self, name: str) -> tuple[int, ...]:
        return self._leaves[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._leaves[name][2]

    def read_many(self, names: list[str]) -> dict[str, np.ndarray]:
        """name -> host array for every name, from one partial restore."""
        target: dict = {}
        for name in names:
            keys = self._leaves[name][0]
            node = target
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = ocp.RestoreArgs(restore_type=np.ndarray)
        try:
            out = self._handler.restore(
                self.item, args=ocp.args.PyTreeRestore(item=target, restore_args=target, partial_restore=True)
            )
        except Exception as e:  # noqa: BLE001 - orbax re-raises some tensorstore read failures as bare Exception
            what = names[0] if len(names) == 1 else f"{len(names)} tensors from {names[0]}"
            raise UserError(f"{self.item}: cannot read {what} ({type(e).__name__}: {e})") from None
        arrays = {}
        for name in names:
            node = out
            for k in self._leaves[name][0]:
                node = node[k]
            arrays[name] = np.asarray(node)
        return arrays

    def close(self) -> None:
        self._handler.close()


def run_model_section(path: str | os.PathLike) -> tuple[dict, Path]:
    """(the `model` section of the run's resolved config.yaml, step folder) of a run or step folder.

    Only the model section is read: the rest of the recipe (data, optimizer) is the trainer's
    business, so a run stays readable whatever later versions validate there.
    """
    step_dir, run_dir = resolve_step_dir(path)
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing; the run folder's resolved config gives the model config")
    model = read_yaml(cfg_path).get("model")
    if not isinstance(model, dict):
        raise UserError(f"{cfg_path}: no `model` mapping in the resolved config")
    return model, step_dir
