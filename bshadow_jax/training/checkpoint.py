"""Writing and resuming a run's orbax checkpoints: params, optimizer state, step, RNG, data iterator.

Layout: RUN/checkpoints/<step>/{params,train,data} (names in `formats.orbax`, which reads them
back for every other command). `params` is its own item so readers restore only the weights.
Saves are async (the data-iterator state is captured synchronously at save time) and
finalised by an atomic rename, so a run killed at any moment leaves only complete steps.
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import orbax.checkpoint as ocp

from bshadow_jax.errors import UserError
from bshadow_jax.formats.orbax import CKPT_DIRNAME
from bshadow_jax.training.state import TrainState


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
