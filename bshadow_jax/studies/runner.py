"""Run an arm study: one base, every arm x seed fine-tuned with identical settings.

Layout of the study folder DIR:
  DIR/base/run/                    the base's pretraining run (a bshadow run folder), or nothing when loaded
  DIR/base/eval.json               the base's narrow/broad/perplexity scores
  DIR/arms/ARM/seedS/run/          the fine-tune (bshadow run folder, resumable)
  DIR/arms/ARM/seedS/diagnose/     diagnose output of the fine-tune against the base (metrics.csv, summary.json, ...)
  DIR/arms/ARM/seedS/record.json   evals, footprint, footprint along training, loss curve (written last)
  DIR/results.json, DIR/report.md, DIR/*.png   written atomically at the end
Re-running on the same DIR reuses every finished arm/seed (record.json with the same
config hash) and resumes unfinished runs from their checkpoints.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bshadow_jax import diagnostics
from bshadow_jax.config import config_hash, from_dict, to_dict
from bshadow_jax.data.evalsets import build_eval_sets as _build_eval_sets
from bshadow_jax.data.tokenizer import get_tokenizer as _get_tokenizer
from bshadow_jax.diagnostics import results as dresults
from bshadow_jax.errors import UserError
from bshadow_jax.evals import evaluate as _evaluate
from bshadow_jax.fileio import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir, safe_join
from bshadow_jax.models import load_pretrained
from bshadow_jax.studies import finalize as fin
from bshadow_jax.training.config import TrainConfig
from bshadow_jax.training.loop import train
from bshadow_jax.studies.aggregate import seed_footprint
from bshadow_jax.studies.spec import ArmSpec, StudyConfig

RECORD = "record.json"
_MATRIX_KEYS = ("name", "component", "layer", "module", "expert", "energy_share", "delta_effective_rank")


def _log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


# ---------------------------------------------------------------- adapters over the other packages

def get_tokenizer(data_cfg):
    return _get_tokenizer(data_cfg)


def build_eval_sets(cfg: StudyConfig, data_cfg, tokenizer):
    del tokenizer  # the eval sets are text; scoring tokenizes
    return _build_eval_sets(data_cfg, **cfg.evals.options)


_KEEP = {"narrow": ("score", "by_category", "acc_norm", "exact_match"), "broad": ("score", "by_category")}


def evaluate(model_cfg, params, tokenizer, eval_sets, evals_spec) -> dict:
    raw = _evaluate(model_cfg, params, tokenizer, eval_sets, batch_size=evals_spec.batch_size,
                    seq_len=evals_spec.seq_len)
    out = {sec: {k: raw[sec][k] for k in keep if k in raw.get(sec, {})} for sec, keep in _KEEP.items()}
    ppl = raw.get("perplexity")
    out["perplexity"] = dict(ppl) if isinstance(ppl, Mapping) else {"value": ppl}
    return _plain(out)


def diagnose(base_params, tuned_params, cfg: StudyConfig):
    return diagnostics.diagnose(base_params, tuned_params, topk=cfg.diagnose.topk, method=cfg.diagnose.method,
                                include=cfg.diagnose.include, exclude=cfg.diagnose.exclude)


def write_diagnose(result, out_dir: Path, *, figures: bool = True) -> None:
    """The diagnose output of one fine-tune; without figures it is metrics.csv, summary.json and a short
    report.md (the study report draws every arm's figures side by side, and ~100 per-unit PNGs would cost
    minutes of the CPU budget)."""
    if figures:
        diagnostics.write_diagnose_outputs(result, out_dir)
        return
    with atomic_output_dir(out_dir) as tmp:
        atomic_write_text(tmp / "metrics.csv", dresults.rows_to_csv(result.rows, result.summary["columns"]))
        atomic_write_json(tmp / "summary.json", dresults.finite_or_none(result.summary))
        fp = result.summary.get("footprint", {})
        atomic_write_text(tmp / "report.md", (
            f"# Diagnose: fine-tune vs base\n\n{result.summary.get('matrices')} matrices; footprint entropy "
            f"{fp.get('entropy')}, gini {fp.get('gini')}, matrices_for_90pct {fp.get('matrices_for_90pct')}.\n"
            "Figures: see the study report (`../../../report.md`), or run `bshadow diagnose` on the two checkpoints.\n"))


def _plain(obj: Any) -> Any:
    """numpy/jax scalars -> Python numbers, recursively (for JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", 1) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None  # JSON has no NaN; aggregation skips None
    return obj


def _matrices(rows) -> list[dict]:
    out = []
    for r in rows:
        m = {k: _plain(r.get(k)) for k in _MATRIX_KEYS}
        out.append(m)
    return out


# ---------------------------------------------------------------- the base

class Base:
    """The shared base: its model config dict, params and the tokenizer."""

    def __init__(self, model_cfg, params, tokenizer, source: str, curve: list[dict]):
        self.model_cfg = model_cfg
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self.curve = curve

    @property
    def model_dict(self) -> dict:
        return to_dict(self.model_cfg)


def prepare_base(cfg: StudyConfig, out: Path, tokenizer) -> Base:
    if cfg.base.load:
        _log(f"loading base {cfg.base.load}")
        model_cfg, params = load_pretrained(cfg.base.load)
        return Base(model_cfg, params, tokenizer, cfg.base.load, [])
    pcfg = cfg.pretrain_config()
    run_dir = out / "base" / "run"
    done = out / "base" / "done.json"
    want = config_hash(to_dict(pcfg))
    info = _read_json(done)
    if info is not None and info.get("config_hash") != want:
        raise UserError(f"{done}: this study folder's base was pretrained with another config; use a new --out")
    t0 = time.perf_counter()
    _log(f"pretraining the base: {pcfg.train.steps} steps" + (" (resuming/reusing)" if run_dir.exists() else ""))
    res = train(pcfg, run_dir, tokenizer=tokenizer, progress=False)
    curve = [{"step": int(m["step"]), "loss": float(m["loss"])} for m in res.metrics if "loss" in m]
    if info is None:
        atomic_write_json(done, {"config_hash": want, "steps": res.step, "wall_s": time.perf_counter() - t0})
    _log(f"base ready in {time.perf_counter() - t0:.1f}s (final loss {curve[-1]['loss'] if curve else float('nan'):.3f})")
    return Base(res.model_config, res.params, tokenizer, f"pretrained:{want}", curve)


# ---------------------------------------------------------------- one arm x seed

def unit_dir(out: Path, arm: str, seed: int) -> Path:
    return safe_join(out, "arms", arm, f"seed{seed}")


def run_unit(cfg: StudyConfig, base: Base, arm: ArmSpec, seed: int, out: Path, eval_sets,
             unit_hash_extra: Mapping[str, Any]) -> dict:
    udir = unit_dir(out, arm.name, seed)
    arm_dict = cfg.arm_dict(arm, seed, base.model_dict)
    steps = int(arm_dict.get("train", {}).get("steps", 100))
    # The loop hands us params every `every` steps without an orbax save (callback_every).
    every = max(1, steps // cfg.diagnose.track_points) if cfg.diagnose.track_points > 0 else 0
    tcfg = from_dict(TrainConfig, arm_dict)
    want = config_hash({"train": to_dict(tcfg), **unit_hash_extra})
    rec = _read_json(udir / RECORD)
    if rec is not None:
        if rec.get("config_hash") == want:
            return rec
        raise UserError(f"{udir / RECORD}: finished with a different config; use a new --out or delete that folder")
    t0 = time.perf_counter()
    curve: list[dict] = []

    def on_checkpoint(step: int, params) -> None:
        if step >= steps:  # the final state is diagnosed (and written) below
            return
        d = diagnose(base.params, params, cfg)
        curve.append({"step": int(step), **seed_footprint(d.summary, d.rows)})

    res = train(tcfg, udir / "run", init_params=base.params, tokenizer=base.tokenizer,
                on_checkpoint=on_checkpoint if every else None, callback_every=every, progress=False)
    t_train = time.perf_counter() - t0
    d = diagnose(base.params, res.params, cfg)
    write_diagnose(d, udir / "diagnose", figures=cfg.diagnose.unit_figures)
    fp = seed_footprint(d.summary, d.rows)
    if not curve or curve[-1]["step"] != res.step:
        curve.append({"step": int(res.step), **fp})
    t1 = time.perf_counter()
    ev = evaluate(base.model_cfg, res.params, base.tokenizer, eval_sets, cfg.evals)
    t_eval = time.perf_counter() - t1
    record = {
        "arm": arm.name, "seed": int(seed), "config_hash": want,
        "narrow": ev.get("narrow", {}), "broad": ev.get("broad", {}), "perplexity": ev.get("perplexity", {}),
        "footprint": fp,
        "footprint_by_module": _plain({k: v.get("energy_share") for k, v in (d.summary.get("by_module") or {}).items()
                                       if isinstance(v, Mapping)}),
        "footprint_curve": curve,
        "train_curve": [{"step": int(m["step"]), "loss": float(m["loss"])} for m in res.metrics if "loss" in m],
        "matrices": _matrices(d.rows),
        "timing_s": {"train": t_train, "eval": t_eval, "total": time.perf_counter() - t0},
    }
    atomic_write_json(udir / RECORD, _plain(record))
    _log(f"{arm.name} seed {seed}: narrow {_score(record, 'narrow')}, broad {_score(record, 'broad')}, "
         f"entropy {fp.get('entropy', float('nan')):.3f} ({record['timing_s']['total']:.1f}s)")
    return record


def _score(rec: Mapping, section: str) -> str:
    v = (rec.get(section) or {}).get("score")
    return "n/a" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------- the whole study

def run_study(cfg: StudyConfig, out_dir: str, *, study: str, title: str,
              finalize: Callable[[StudyConfig, Path, dict, dict, Base, dict | None], None] | None = None) -> dict:
    out = check_output_dir(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    arms = cfg.active_arms()
    first = cfg.arm_config(arms[0], cfg.seeds[0])
    tokenizer = get_tokenizer(first.data)
    base = prepare_base(cfg, out, tokenizer)
    eval_sets = build_eval_sets(cfg, first.data, tokenizer)
    base_eval_path = out / "base" / "eval.json"
    base_eval = _read_json(base_eval_path)
    if base_eval is None:
        base_eval = evaluate(base.model_cfg, base.params, tokenizer, eval_sets, cfg.evals)
        atomic_write_json(base_eval_path, base_eval)
    extra = {"base": base.source, "evals": to_dict(cfg.evals), "diagnose": to_dict(cfg.diagnose)}
    records: dict[str, list[dict]] = {}
    for arm in arms:
        for seed in cfg.seeds:
            records.setdefault(arm.name, []).append(run_unit(cfg, base, arm, seed, out, eval_sets, extra))
    results = fin.build_results(cfg, records, study=study, base_eval=base_eval,
                                wall_s=time.perf_counter() - t_start)
    fin.write_outputs(cfg, out, results, records, base_eval=base_eval, base_curve=base.curve, title=title)
    _log(f"study done in {time.perf_counter() - t_start:.1f}s: {out / 'results.json'}")
    return results
