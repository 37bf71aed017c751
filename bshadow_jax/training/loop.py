"""The training loop: config -> mesh -> sharded state -> jitted steps -> checkpoints and logs.

Run folder (docs/outputs.md, "Training run folder"):
  DIR/config.yaml        resolved config (model.vocab_size filled in)
  DIR/checkpoints/<step> orbax: params, optimizer state, step, RNG, data-iterator state
  DIR/metrics.jsonl      one object per logged step: step, loss, grad_norm, lr, tokens, tokens_per_s
  DIR/tensorboard/       TensorBoard event files
  DIR/tokenizer/         the tokenizer (export copies it)
Re-running on the same DIR resumes from the latest checkpoint; metrics.jsonl is cut back to
that step first, so a run killed at any moment and resumed ends with the same file as an
uninterrupted one (same device count: the compiled program and the data order are replayed).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from bshadow_jax.config import dump_yaml, from_dict, read_yaml, to_dict
from bshadow_jax.errors import UserError
from bshadow_jax.data.pipeline import BATCH_KEYS, make_train_dataset
from bshadow_jax.data.tokenizer import get_tokenizer
from bshadow_jax.fileio import atomic_output_dir, atomic_write_text, check_output_dir, enable_compilation_cache
from bshadow_jax.formats.orbax import CONFIG_NAME, TOKENIZER_DIRNAME, resolve_step_dir
from bshadow_jax.formats.sources import open_checkpoint
from bshadow_jax.models.hf import checkpoint_tokenizer
from bshadow_jax.models.llama import LlamaConfig, param_shapes
from bshadow_jax.models.loading import checkpoint_config, load_pretrained
from bshadow_jax.training import mesh as mesh_lib
from bshadow_jax.training.checkpoint import RunCheckpointer
from bshadow_jax.training.compiled import compile_train_step
from bshadow_jax.training.config import TrainConfig, load_train_config

METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass
class TrainResult:
    params: Any                  # host numpy pytree (HF-named nested dict)
    metrics: list[dict]          # every logged step of the run, including before a resume
    out_dir: Path
    model_config: Any = None     # the resolved LlamaConfig
    step: int = 0


class NonFiniteLossError(UserError):
    """The loss or gradient norm became NaN/inf; the bad state was not saved."""


# ----------------------------------------------------------------------------- helpers

def _is_main() -> bool:
    return jax.process_index() == 0


def _read_metrics(path: Path, *, upto: int | None) -> list[dict]:
    """Logged metrics with step <= upto; a torn last line (killed mid-write) is dropped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and (upto is None or row.get("step", 0) <= upto):
            rows.append(row)
    return rows


def _resolved_config_dict(cfg: TrainConfig, model_cfg) -> dict:
    d = to_dict(cfg)
    d["model"] = {**d["model"], "vocab_size": model_cfg.vocab_size}
    return d


def _check_same_model(run_dir: Path, resolved: dict) -> None:
    old_path = run_dir / CONFIG_NAME
    if not old_path.is_file():
        return
    old = read_yaml(old_path).get("model", {})
    new = resolved["model"]
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        raise UserError(
            f"{old_path}: this run folder holds a model with a different model.{diff[0]} "
            f"({old.get(diff[0])!r} vs {new.get(diff[0])!r}); use a new --out folder"
        )


def _start_from_checkpoint(cfg: TrainConfig, run_dir: Path, tokenizer) -> tuple[TrainConfig, dict | None, Any]:
    """`init: CKPT`: (cfg with the checkpoint's model section, its params or None when the run resumes, the
    tokenizer: data.tokenizer's if set, else the checkpoint's). A run that already has a checkpoint
    resumes from its own folder (model section and tokenizer included): the init checkpoint is not read."""
    try:
        resolve_step_dir(run_dir)
    except UserError:  # a new run: one read of the init checkpoint (a GGUF's metadata alone takes seconds)
        source = cfg.init
        model_cfg, params = load_pretrained(source)
    else:  # resuming: the run's own model config; its checkpoint has the weights
        source, params = run_dir, None
        with open_checkpoint(source) as src:
            model_cfg = checkpoint_config(src)
    if cfg.model:
        given = dict(cfg.model)
        given["vocab_size"] = given.get("vocab_size") or model_cfg.vocab_size
        given_cfg = from_dict(LlamaConfig, given, "model")
        if given_cfg != model_cfg:
            key = next(f.name for f in dataclasses.fields(LlamaConfig)
                       if getattr(given_cfg, f.name) != getattr(model_cfg, f.name))
            raise UserError(f"model.{key}: {getattr(given_cfg, key)!r}, but the init checkpoint {cfg.init} has "
                            f"{getattr(model_cfg, key)!r}; leave the model section out to train the checkpoint's model")
    cfg = dataclasses.replace(cfg, model=to_dict(model_cfg))
    cfg.validate()  # train.seq_len against the checkpoint's context length
    if tokenizer is None:
        tokenizer = get_tokenizer(cfg.data) if cfg.data.tokenizer else checkpoint_tokenizer(source)
    if len(tokenizer) > model_cfg.vocab_size:
        raise UserError(f"{cfg.init}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                        f"{model_cfg.vocab_size}")
    return cfg, params, tokenizer


def _default_dataset(cfg: TrainConfig, tokenizer, local_batch: int, rows: slice | None = None):
    """The data pipeline's batches for this host. With several processes, every process builds the global
    batch and keeps its `rows`: the data order is that of one process with the same global batch, so a
    run's result does not depend on how its devices are split into processes (at the cost of every host
    preparing the whole batch, cheap next to the step for the models this trains)."""
    if rows is None or jax.process_count() == 1:
        return make_train_dataset(
            cfg.data, tokenizer, seq_len=cfg.train.seq_len, batch_size=local_batch, seed=cfg.seed,
            shard_index=jax.process_index(), shard_count=jax.process_count(),
        )
    ds = make_train_dataset(cfg.data, tokenizer, seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                            seed=cfg.seed)
    return ds.map(functools.partial(_take_rows, rows=rows))


def _take_rows(batch: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in batch.items()}


def _local_rows(mesh, global_batch: int) -> slice:
    """The rows of the global batch that this process's devices hold (mesh.shard_batch's layout)."""
    idx = mesh_lib.batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = [i[0].start or 0 for i in idx.values()]
    stops = [global_batch if i[0].stop is None else i[0].stop for i in idx.values()]
    lo, hi = min(starts), max(stops)
    if hi - lo != global_batch // jax.process_count():
        raise UserError(f"mesh: this process's devices hold rows {lo}..{hi - 1} of the batch, not one contiguous "
                        f"{global_batch // jax.process_count()}-row block; use a mesh whose data axis spans the hosts")
    return slice(lo, hi)


def _to_host(tree):
    """A (possibly sharded over several processes) pytree as numpy on every process."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)  # every process calls it: a collective


def _save_tokenizer(tokenizer, run_dir: Path) -> None:
    target = run_dir / TOKENIZER_DIRNAME
    if tokenizer is None or target.exists() or not hasattr(tokenizer, "save_pretrained"):
        return
    with atomic_output_dir(target) as tmp:
        tokenizer.save_pretrained(str(tmp))


def _summary_writer_cls():
    """tensorboardX's SummaryWriter without the 3-4 s torch import it does only to accept torch tensors."""
    if "tensorboardX" not in sys.modules and "torch" not in sys.modules:
        sys.modules["torch"] = None  # makes `import torch` inside tensorboardX raise ImportError
        try:
            import tensorboardX
        finally:
            del sys.modules["torch"]
    from tensorboardX import SummaryWriter

    return SummaryWriter


class _Logger:
    """metrics.jsonl + TensorBoard + progress, on the main process only.

    Progress: a tqdm bar on a terminal; when stderr is not a terminal (a log file, a batch job) and the
    caller asked for the default (progress=None), one plain line per logged step (every train.log_every).
    """

    def __init__(self, run_dir: Path, start: int, total: int, progress):
        self.rows = _read_metrics(run_dir / METRICS_NAME, upto=start)
        self.enabled = _is_main()
        self.callback = progress if callable(progress) else None
        self.bar = None
        self.tb = None
        self.total = total
        self.lines = progress is None and not sys.stderr.isatty()
        if not self.enabled:
            return
        # Cut the file back to the restored step (atomically) before appending again.
        atomic_write_text(run_dir / METRICS_NAME, "".join(json.dumps(r) + "\n" for r in self.rows))
        self.file = open(run_dir / METRICS_NAME, "a", encoding="utf-8")
        SummaryWriter = _summary_writer_cls()
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start + 1)
        show = sys.stderr.isatty() if progress is None or callable(progress) else bool(progress)
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def log(self, row: dict) -> None:
        self.rows.append(row)
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"train/{k}", v, row["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row.get('tokens_per_s', 0):.0f}")
        elif self.lines:
            print(f"[train {time.strftime('%H:%M:%S')}] step {row['step']}/{self.total} loss {row['loss']:.4f} "
                  f"grad_norm {row.get('grad_norm', float('nan')):.3f} lr {row.get('lr', float('nan')):.3g} "
                  f"{row.get('tokens_per_s', 0):.0f} tok/s", file=sys.stderr, flush=True)
        if self.callback is not None:
            self.callback(row["step"], row)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def flush(self) -> None:
        if self.enabled:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()
            if self.bar is not None:
                self.bar.close()


# ----------------------------------------------------------------------------- train

def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    init_params=None,
    tokenizer=None,
    on_checkpoint: Callable[[int, Any], None] | None = None,
    progress=None,
    dataset: Callable[[int], Any] | None = None,
    async_checkpoints: bool = True,
    callback_every: int = 0,
    batch_map: Callable[[dict], dict] | None = None,
) -> TrainResult:
    """Train (or resume) a run in `out_dir`.

    init_params: start from these params (e.g. a pretrained model) instead of a random init; with
        `cfg.init` set and no init_params, the checkpoint it names is read (model section, weights, tokenizer).
    tokenizer: a transformers tokenizer; default `data.tokenizer.get_tokenizer(cfg.data)`.
    on_checkpoint(step, numpy_params): called after each checkpoint save, and also every
        `callback_every` steps when that is > 0 (cheap footprint tracking, no orbax save).
    progress: None = tqdm bar when stderr is a terminal; True/False to force; or a
        callable(step, metrics_row) called on each logged step.
    dataset: callable(local_batch_size) -> grain IterDataset of batch dicts (host-local rows);
        default is the data pipeline for `cfg.data`.
    batch_map: a function of each host-local batch dict, mapped onto the dataset (e.g. to observe what
        the run is fed); it must return the batch unchanged for the run to stay the same run.
    """
    mesh_lib.maybe_initialize_distributed()
    run_dir = check_output_dir(out_dir).absolute()
    tc = cfg.train
    # Everything a user can get wrong is checked here, before anything compiles.
    mesh = mesh_lib.make_mesh(cfg.mesh, batch_size=tc.batch_size, grad_accum=tc.grad_accum)
    if tc.batch_size % jax.process_count():
        raise UserError(f"train.batch_size: {tc.batch_size} is not divisible by the {jax.process_count()} hosts")
    local_batch = tc.batch_size // jax.process_count()
    if cfg.init and init_params is None:
        cfg, init_params, tokenizer = _start_from_checkpoint(cfg, run_dir, tokenizer)
        tc = cfg.train
    if tokenizer is None and (dataset is None or not cfg.model.get("vocab_size")):
        tokenizer = get_tokenizer(cfg.data)
    model_cfg = cfg.llama_config(len(tokenizer) if tokenizer is not None else None)
    resolved = _resolved_config_dict(cfg, model_cfg)
    _check_same_model(run_dir, resolved)

    if init_params is not None:
        want = jax.tree.map(tuple, param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
        got = jax.tree.map(lambda x: tuple(np.shape(x)), init_params)
        is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
        if jax.tree.structure(want, is_leaf=is_shape) != jax.tree.structure(got, is_leaf=is_shape) or want != got:
            raise UserError("init_params: shapes or names do not match the config's model section")
    compiled = compile_train_step(model_cfg, cfg.optim, steps=tc.steps, mesh=mesh, compute_dtype=tc.compute_dtype,
                                  grad_accum=tc.grad_accum, remat=tc.remat)
    abstract, shardings, step_fn = compiled.abstract, compiled.shardings, compiled.step_fn

    if _is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_NAME, dump_yaml(resolved))
        _save_tokenizer(tokenizer, run_dir)
    ds = dataset(local_batch) if dataset is not None else _default_dataset(
        cfg, tokenizer, local_batch, _local_rows(mesh, tc.batch_size) if jax.process_count() > 1 else None)
    if batch_map is not None:
        ds = ds.map(batch_map)
    data_iter = iter(ds)
    ckpt = RunCheckpointer(run_dir, keep=tc.keep_checkpoints, async_save=async_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None:
        target = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings)
        state = ckpt.restore(latest, target, data_iter)
    elif init_params is not None:
        state = compiled.init_from_params(jax.tree.map(lambda x: np.asarray(x, np.float32), init_params), cfg.seed)
    else:
        state = compiled.init_random(jax.random.key(cfg.seed), cfg.seed)
    start = int(state.step)
    logger = _Logger(run_dir, start, tc.steps, progress)
    tokens_per_step = tc.batch_size * tc.seq_len
    last_good = latest

    def check(step: int, m: dict) -> dict:
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not (math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"])):
            ckpt.wait()
            where = f"the last good checkpoint (step {last_good}) is kept in {ckpt.directory}" if last_good else (
                "no checkpoint was saved yet")
            raise NonFiniteLossError(
                f"{run_dir}: loss became {m['loss']} (grad_norm {m['grad_norm']}) at step {step}; training stopped "
                f"without saving this state; {where}; rerun the same command to resume, with changed settings "
                f"such as optim.lr={cfg.optim.lr / 10:g} or optim.clip_norm=0.5"
            )
        return m

    t_last, step_last = time.perf_counter(), start
    pending: tuple[int, dict] | None = None

    def handle(step: int, m: dict) -> None:
        nonlocal t_last, step_last
        m = check(step, m)
        logger.advance()
        if step % tc.log_every == 0 or step == tc.steps:
            now = time.perf_counter()
            row = {"step": step, **m, "tokens_per_s": tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)}
            row["tokens"] = int(row["tokens"])
            logger.log(row)
            t_last, step_last = now, step

    try:
        for s in range(start, tc.steps):
            batch = next(data_iter)
            batch = mesh_lib.shard_batch({k: batch[k] for k in BATCH_KEYS}, mesh)
            state, metrics = step_fn(state, batch)
            if pending is not None:
                handle(*pending)  # one step behind: the host never waits for the step just launched
            pending = (s + 1, metrics)
            if (s + 1) % tc.checkpoint_every == 0 or s + 1 == tc.steps:
                handle(*pending)
                pending = None
                logger.flush()
                ckpt.save(state, data_iter)
                last_good = s + 1
                if on_checkpoint is not None:
                    on_checkpoint(s + 1, _to_host(state.params))
            elif on_checkpoint is not None and callback_every > 0 and (s + 1) % callback_every == 0:
                handle(*pending)  # never hand out params of a diverged step
                pending = None
                on_checkpoint(s + 1, _to_host(state.params))
        if pending is not None:
            handle(*pending)
    finally:
        logger.close()
        ckpt.close()
    params = _to_host(state.params)
    return TrainResult(params=params, metrics=logger.rows, out_dir=run_dir, model_config=model_cfg, step=int(state.step))


def train_from_cli(config_path: str, out_dir: str, overrides: list[str], *,
                   dataset_fn: Callable[[TrainConfig, int], Any] | None = None) -> int:
    """`bshadow train CONFIG --out DIR key=value...`: load the config, train (or resume), print a summary.

    dataset_fn(cfg, local_batch_size) -> grain IterDataset of batch dicts: the training data, passed
    to `train` as `dataset` (e.g. the synthetic stream in tests). None, as the CLI calls it: the data
    pipeline for `cfg.data`.
    """
    cfg = load_train_config(config_path, list(overrides))
    enable_compilation_cache()
    if not ("--debug" in sys.argv or os.environ.get("BSHADOW_DEBUG") == "1"):
        # orbax's writer threads log full tracebacks through absl on write failures; the CLI
        # reports those as one `error:` line instead (see RunCheckpointer._write_errors).
        import logging

        logging.getLogger("absl").setLevel(logging.CRITICAL)
    result = train(cfg, out_dir, dataset=None if dataset_fn is None else functools.partial(dataset_fn, cfg))
    last = result.metrics[-1] if result.metrics else {}
    loss = f"{last['loss']:.4f}" if "loss" in last else "n/a"
    print(f"trained {result.step} steps; final loss {loss}; run folder {result.out_dir}")
    return 0


__all__ = ["TrainResult", "NonFiniteLossError", "train", "train_from_cli", "TrainConfig"]
