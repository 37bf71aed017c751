"""Orbax checkpoints of a run: params, optimizer state, step, RNG and the data-iterator state.

Layout: RUN/checkpoints/<step>/{params,train,data}. `params` is its own item so that
`load_run_params` (export, `models.load_pretrained`) reads only the weights, and `ParamsLeaves`
(diagnostics) reads them one tensor at a time.
Saves are async (the data-iterator state is captured synchronously at save time) and
finalised by an atomic rename, so a run killed at any moment leaves only complete steps.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from bshadow_jax.errors import UserError
from bshadow_jax.training.state import TrainState

CKPT_DIRNAME = "checkpoints"
CONFIG_NAME = "config.yaml"
TOKENIZER_DIRNAME = "tokenizer"


def _grain_args():
    import grain

    return grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore


class RunCheckpointer:
    """CheckpointManager over RUN/checkpoints with keep-N and async saves."""

    def __init__(self, run_dir: str | os.PathLike, *, keep: int, async_save: bool = True):
        self.directory = Path(run_dir).absolute() / CKPT_DIRNAME
        if self.directory.exists() and not self.directory.is_dir():
            raise UserError(f"{self.directory}: exists and is not a folder")
        self._pending_step: int | None = None
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,  # leftovers of a save killed half-way
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state: TrainState, data_iter=None) -> None:
        save_cls, _ = _grain_args()
        items = {
            "params": ocp.args.StandardSave(state.params),
            "train": ocp.args.StandardSave({"opt_state": state.opt_state, "step": state.step, "rng": state.rng}),
        }
        if data_iter is not None:
            items["data"] = save_cls(data_iter)
        step = int(state.step)
        with self._write_errors(step):
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        self._pending_step = step

    def restore(self, step: int, abstract_state: TrainState, data_iter=None) -> TrainState:
        """Restore onto `abstract_state`'s shapes and shardings (ShapeDtypeStructs); data_iter in place."""
        _, restore_cls = _grain_args()
        items = {
            "params": ocp.args.StandardRestore(abstract_state.params),
            "train": ocp.args.StandardRestore(
                {"opt_state": abstract_state.opt_state, "step": abstract_state.step, "rng": abstract_state.rng}
            ),
        }
        if data_iter is not None:
            items["data"] = restore_cls(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        train = out["train"]
        return TrainState(params=out["params"], opt_state=train["opt_state"], step=train["step"], rng=train["rng"])

    def wait(self) -> None:
        with self._write_errors(self._pending_step):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._write_errors(self._pending_step):
            self.manager.wait_until_finished()
            self.manager.close()

    @contextlib.contextmanager
    def _write_errors(self, step: int | None):
        """A failed write (disk full, permissions) becomes one clear UserError naming the folder."""
        try:
            yield
        except Exception as e:  # orbax re-raises its writer threads' errors, sometimes wrapped
            os_err = next((x for x in (e, e.__cause__, e.__context__) if isinstance(x, OSError)), None)
            if os_err is None:
                # tensorstore reports write failures as ValueError("... [os_error_code='27'] ...")
                code = re.search(r"os_error_code='(\d+)'", str(e))
                if code is None:
                    raise
                os_err = OSError(int(code.group(1)), os.strerror(int(code.group(1))))
            try:
                kept = self.manager.latest_step()
            except Exception:  # noqa: BLE001 - the folder itself may be the problem
                kept = None
            what = f"the last complete checkpoint (step {kept}) is kept" if kept is not None else "no complete checkpoint yet"
            reason = os_err.strerror or str(os_err)
            # an async save fails later, inside the next save or wait: name the step whose files failed
            failed = re.search(r"/(\d+)\.orbax-checkpoint-tmp", str(e))
            step = int(failed.group(1)) if failed else step
            raise UserError(
                f"{self.directory}: saving step {step} failed ({reason}); {what}; fix the disk or folder and "
                "rerun the same command to resume"
            ) from e


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
    from bshadow_jax.models.llama import unflatten_params

    leaves = ParamsLeaves(step_dir)
    try:
        return unflatten_params(leaves.read_many(leaves.names()))
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
            keys = tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)
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


def load_run_config(path: str | os.PathLike):
    """(TrainConfig, step folder) of a run folder's latest step or of one orbax step folder."""
    from bshadow_jax.training.config import TrainConfig
    from bshadow_jax.config import from_dict, read_yaml

    step_dir, run_dir = resolve_step_dir(path)
    cfg_path = run_dir / CONFIG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path}: missing; the run folder's resolved config gives the model config")
    return from_dict(TrainConfig, read_yaml(cfg_path)), step_dir


def load_run_params(path: str | os.PathLike):
    """(LlamaConfig, numpy params) of a run folder's latest step or of one orbax step folder."""
    train_cfg, step_dir = load_run_config(path)
    params = load_params_numpy(step_dir)
    vocab = params["model"]["embed_tokens"]["weight"].shape[0]
    return train_cfg.llama_config(vocab), params
