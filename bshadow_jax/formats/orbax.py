"""Orbax checkpoints as read-only weight stores: run folders, step folders, any stack's checkpoints.

A bshadow run folder is RUN/config.yaml + RUN/checkpoints/<step>/{params,train,data}; `params`
is its own item so that readers restore only the weights, one tensor at a time if need be.
Nothing here knows about training: the writer (`training.checkpoint`) uses these names.

Any other orbax checkpoint is read too (`resolve_orbax`): a pytree folder
(`StandardCheckpointer.save(path, tree)`), a step folder of items (`CheckpointManager`), or a
CheckpointManager folder (its latest finished step), whichever JAX stack wrote it. Inside the
chosen item only the `params` subtree is read when there is one (`pytree.params_view`).
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bshadow_jax.config import read_yaml
from bshadow_jax.errors import UserError
from bshadow_jax.formats.pytree import key_name, params_view, unflatten

CKPT_DIRNAME = "checkpoints"
CONFIG_NAME = "config.yaml"
TOKENIZER_DIRNAME = "tokenizer"
PYTREE_METADATA = "_METADATA"  # orbax's tree metadata: every pytree item folder has one
TMP_MARK = ".orbax-checkpoint-tmp"  # orbax writes into NAME.orbax-checkpoint-tmp-<n> and renames when done
# written when a save finished (orbax >= 0.5 writes both, locally as on cloud storage)
COMMIT_MARKERS = ("commit_success.txt", "_CHECKPOINT_METADATA")


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


# ------------------------------------------------------------------------------- any orbax checkpoint

def _is_tmp(p: Path) -> bool:
    return TMP_MARK in p.name


def _is_pytree(p: Path) -> bool:
    return p.is_dir() and not _is_tmp(p) and (p / PYTREE_METADATA).is_file()


def _committed(p: Path) -> bool:
    return any((p / m).exists() for m in COMMIT_MARKERS)


def _items(step: Path) -> list[str]:
    return sorted(c.name for c in step.iterdir() if _is_pytree(c))


def _is_bshadow_step(p: Path) -> bool:
    return _is_step_dir(p) and p.parent.name == CKPT_DIRNAME and (p.parent.parent / CONFIG_NAME).is_file()


def _finished(p: Path) -> None:
    if _is_tmp(p):
        raise UserError(f"{p}: half-written orbax checkpoint (an orbax tmp folder); use a finished step")
    if not _committed(p):
        raise UserError(f"{p}: half-written orbax checkpoint (no {' or '.join(COMMIT_MARKERS)} commit marker)")


def _latest_step(root: Path) -> Path | None:
    """The latest finished step folder of a CheckpointManager folder; None when it has no step folders."""
    steps = [c for c in root.iterdir() if c.is_dir() and c.name.isdigit()]
    half = [c for c in root.iterdir() if c.is_dir() and _is_tmp(c) and c.name.split(".")[0].isdigit()]
    if not steps and not half:
        return None
    done = sorted((c for c in steps if _committed(c) and (_items(c) or _is_pytree(c))), key=lambda c: int(c.name))
    if not done:
        what = sorted(c.name for c in steps + half)
        raise UserError(f"{root}: no finished orbax step (half-written: {', '.join(what)})")
    return done[-1]


def pick_item(step: Path, item: str | None) -> Path:
    """The item folder of a step: `item`, else `params`, else the only item; several others: refused."""
    items = _items(step)
    if item is not None:
        if item not in items:
            raise UserError(f"{step}: --item {item}: no such orbax item (items: {', '.join(items) or 'none'})")
        return step / item
    if "params" in items:
        return step / "params"
    if len(items) == 1:
        return step / items[0]
    if not items:
        raise UserError(f"{step}: no orbax item with arrays (no {PYTREE_METADATA} in any subfolder)")
    raise UserError(f"{step}: {len(items)} orbax items ({', '.join(items)}); pick one with --item NAME")


def resolve_orbax(path: str | os.PathLike, item: str | None = None) -> tuple[Path, dict | None, bool]:
    """(pytree item folder to read, the bshadow run's `model` section or None, whether `item` picked it).

    Args:
      path: a bshadow run or step folder; an orbax pytree folder; a step folder of items; or a
        CheckpointManager folder (its latest finished step).
      item: the item of a multi-item step to read (default: `params`, else the only item);
        a checkpoint that is one pytree has no items and ignores it.

    Raises:
      UserError: naming the folder, for a half-written step (orbax tmp folder or no commit
        marker), a folder that is no orbax checkpoint, or an unknown or ambiguous item.
    """
    p = Path(path)
    if _is_tmp(p):
        _finished(p)
    if (p / CKPT_DIRNAME).is_dir() or _is_bshadow_step(p):
        model, step = run_model_section(p)
        return pick_item(step, item or "params"), model, item is not None
    if _is_pytree(p):
        _finished(p)
        return p, None, False
    if _items(p):
        _finished(p)
        return pick_item(p, item), None, item is not None
    step = _latest_step(p)
    if step is not None:
        if _is_pytree(step):
            return step, None, False
        return pick_item(step, item), None, item is not None
    raise UserError(f"{p}: not a bshadow run folder (no {CKPT_DIRNAME}/) nor an orbax checkpoint "
                    f"(no {PYTREE_METADATA}, item folders or step folders)")


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

    def __init__(self, step_dir: str | os.PathLike, item: str | None = "params"):
        self.item = Path(step_dir).absolute() / item if item else Path(step_dir).absolute()
        # the handler, not a Checkpointer: one warns on every call that an item folder has no step metadata
        self._handler = ocp.PyTreeCheckpointHandler()
        try:
            meta = self._handler.metadata(self.item)
        except Exception as e:  # noqa: BLE001 - any orbax/tensorstore failure here means an unreadable item
            raise UserError(f"{self.item}: cannot read the orbax params checkpoint ({type(e).__name__}: {e})") from None
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        arrays = {}
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
                continue  # strings and other non-array leaves are not tensors
            try:
                dtype = np.dtype(leaf.dtype)
            except TypeError:
                continue
            arrays[tuple(key_name(k) for k in key_path)] = (tuple(int(d) for d in leaf.shape), dtype)
        if not arrays:
            raise UserError(f"{self.item}: the orbax checkpoint holds no arrays")
        # a TrainState's or MaxText's `params` subtree only; nnx's trailing `value` dropped
        self._leaves = {name: (keys, *arrays[keys]) for keys, name in params_view(list(arrays)).items()}

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
