"""Run an arm study: bases (pretraining seeds), every arm x base x seed fine-tuned with identical settings.

Layout of the study folder DIR:
  DIR/bases/baseB/run/                 base B's pretraining run (a bshadow run folder), or nothing when loaded
  DIR/bases/baseB/eval.json            base B's scores, with every item (items.csv's base rows)
  DIR/arms/ARM/baseB/seedS/run/        the fine-tune (bshadow run folder, resumable)
  DIR/arms/ARM/baseB/seedS/diagnose/   diagnose output of the fine-tune against its base (metrics.csv, summary.json, ...)
  DIR/arms/ARM/baseB/seedS/record.json evals with every item, footprint variants, distinct tokens, curves (written last)
  DIR/noise_floor/ARM/baseB/seedI-seedJ.json  footprint of W_seedI - W_seedJ (and the between-arm deltas)
  DIR/results.json, DIR/items.csv, DIR/passages.csv, DIR/report.md, DIR/*.png   written atomically at the end
Re-running on the same DIR reuses every finished unit (record.json with the same config hash)
and resumes unfinished runs from their checkpoints.

Several processes (bshadow_jax.distributed): every process takes part in each fine-tune (the training
loop's collectives) and in each diagnose (the matrices are split across processes); process 0 alone
evaluates, writes every file and aggregates, and the others return an empty result. Every process must
see the same DIR (a shared file system).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from bshadow_jax import diagnostics, distributed
from bshadow_jax.config import config_hash, from_dict, to_dict
from bshadow_jax.data.budget import source_budget, unintended_repeats
from bshadow_jax.data.pipeline import TokenCounter, distinct_tokens, first_batches, replay_dataset
from bshadow_jax.data.tokenizer import get_tokenizer as _get_tokenizer
from bshadow_jax.diagnostics import results as dresults
from bshadow_jax.diagnostics.footprint import NON_BLOCK_MODULES
from bshadow_jax.errors import UserError
from bshadow_jax.fileio import atomic_output_dir, atomic_write_json, atomic_write_text, check_output_dir, safe_join
from bshadow_jax.models import load_pretrained
from bshadow_jax.studies import finalize as fin
from bshadow_jax.training.config import TrainConfig
from bshadow_jax.training.loop import train
from bshadow_jax.studies.aggregate import footprint_variants, seed_footprint
from bshadow_jax.studies.evalsuite import EvalSuite, build_suite
from bshadow_jax.studies.evalsuite import evaluate as suite_evaluate
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


def build_eval_sets(cfg: StudyConfig, data_cfg, tokenizer) -> EvalSuite:
    del tokenizer  # the eval sets are text; scoring tokenizes
    return build_suite(cfg.evals, data_cfg)


def evaluate(model_cfg, params, tokenizer, suite: EvalSuite, evals_spec) -> dict:
    """One model's scores, with every scored item and held-out passage (the statistics resample them)."""
    return _plain(suite_evaluate(suite, model_cfg, params, tokenizer, evals_spec))


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
    """One base: its label (pretraining seed), model config, params and the tokenizer."""

    def __init__(self, model_cfg, params, tokenizer, source: str, curve: list[dict], seed: int = 0):
        self.model_cfg = model_cfg
        self.params = params
        self.tokenizer = tokenizer
        self.source = source
        self.curve = curve
        self.seed = int(seed)

    @property
    def model_dict(self) -> dict:
        return to_dict(self.model_cfg)


def base_dir(out: Path, seed: int) -> Path:
    return safe_join(out, "bases", f"base{seed}")


def prepare_base(cfg: StudyConfig, out: Path, tokenizer, seed: int) -> Base:
    if cfg.base.load:
        _log(f"loading base {cfg.base.load}")
        model_cfg, params = load_pretrained(cfg.base.load)
        return Base(model_cfg, params, tokenizer, cfg.base.load, [], seed)
    pcfg = cfg.pretrain_config({"seed": int(seed)})
    run_dir = base_dir(out, seed) / "run"
    done = base_dir(out, seed) / "done.json"
    want = config_hash(to_dict(pcfg))
    info = _read_json(done)
    if info is not None and info.get("config_hash") != want:
        raise UserError(f"{done}: this study folder's base was pretrained with another config; use a new --out")
    t0 = time.perf_counter()
    _log(f"pretraining base {seed}: {pcfg.train.steps} steps" + (" (resuming/reusing)" if run_dir.exists() else ""))
    res = train(pcfg, run_dir, tokenizer=tokenizer, progress=False)
    curve = [{"step": int(m["step"]), "loss": float(m["loss"])} for m in res.metrics if "loss" in m]
    if info is None and distributed.is_main():
        atomic_write_json(done, {"config_hash": want, "steps": res.step, "wall_s": time.perf_counter() - t0})
    _log(f"base {seed} ready in {time.perf_counter() - t0:.1f}s (final loss "
         f"{curve[-1]['loss'] if curve else float('nan'):.3f})")
    return Base(res.model_config, res.params, tokenizer, f"pretrained:{want}", curve, seed)


# ---------------------------------------------------------------- fine-tuning batches shared across bases

class StreamCache:
    """Each fine-tune's batches, made once for every base that runs them.

    A fine-tune's data depends on its data section, seed and batch shape, not on the base, so an
    arm and seed on three bases (and the optimizer control on its partner's data) feed the same
    batches; the data pipeline's per-batch Python work is then done once per stream, not once per
    unit. A stream is kept only while later units still use it, and only within `max_bytes`; with
    several processes every unit builds its own (each process keeps only its rows of the batch).
    """

    def __init__(self, uses: Mapping[str, int], max_bytes: int = 512 << 20):
        self.left = dict(uses)
        self.max_bytes = max_bytes
        self.kept: dict[str, list[dict]] = {}

    @staticmethod
    def key(tcfg: TrainConfig) -> str:
        t = tcfg.train
        return config_hash({"data": to_dict(tcfg.data), "seed": tcfg.seed, "steps": t.steps,
                            "batch_size": t.batch_size, "seq_len": t.seq_len})

    def dataset(self, tcfg: TrainConfig, tokenizer):
        """train()'s `dataset` argument for this unit, or None for the pipeline itself."""
        if jax.process_count() > 1:
            return None
        k = self.key(tcfg)
        self.left[k] = self.left.get(k, 1) - 1
        batches = self.kept.pop(k, None) if self.left[k] <= 0 else self.kept.get(k)
        if batches is None:
            t = tcfg.train
            batches = first_batches(tcfg.data, tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
                                    seed=tcfg.seed, steps=t.steps)
            size = sum(v.nbytes for b in batches for v in b.values())
            used = sum(v.nbytes for bs in self.kept.values() for b in bs for v in b.values())
            if self.left[k] > 0 and used + size <= self.max_bytes:
                self.kept[k] = batches
        return lambda local_batch: replay_dataset(batches)


# ---------------------------------------------------------------- one arm x seed

def unit_dir(out: Path, arm: str, base: int, seed: int) -> Path:
    return safe_join(out, "arms", arm, f"base{base}", f"seed{seed}")


def run_unit(cfg: StudyConfig, base: Base, arm: ArmSpec, seed: int, out: Path, eval_sets,
             unit_hash_extra: Mapping[str, Any], streams: StreamCache | None = None) -> dict:
    udir = unit_dir(out, arm.name, base.seed, seed)
    arm_dict = cfg.arm_dict(arm, seed, base.model_dict)
    steps = int(arm_dict.get("train", {}).get("steps", 100))
    # The loop hands us params every `every` steps without an orbax save (callback_every).
    every = max(1, steps // cfg.diagnose.track_points) if cfg.diagnose.track_points > 0 else 0
    tcfg = from_dict(TrainConfig, arm_dict)
    want = config_hash({"train": to_dict(tcfg), "base": base.source, **unit_hash_extra})
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
        d = diagnose(base.params, params, cfg)  # every process takes part; process 0 gets the result
        if d is not None:
            curve.append({"step": int(step), **seed_footprint(d.summary, d.rows)})

    budget = source_budget(tcfg.data, base.tokenizer, steps=steps, batch_size=tcfg.train.batch_size,
                           seq_len=tcfg.train.seq_len, seed=tcfg.seed)
    for name in unintended_repeats(budget, arm.intended_repeats):
        _log(f"warning: {arm.name} draws {budget['streams'][name]['epochs']:.1f} epochs of stream {name!r}, which "
             f"the config does not list in arms.{arm.name}.intended_repeats")
    counter = TokenCounter(steps)  # counts the tokens the loop's own stream feeds, as it feeds them
    res = train(tcfg, udir / "run", init_params=base.params, tokenizer=base.tokenizer,
                on_checkpoint=on_checkpoint if every else None, callback_every=every, progress=False,
                batch_map=counter, dataset=streams.dataset(tcfg, base.tokenizer) if streams else None)
    t_train = time.perf_counter() - t0
    d = diagnose(base.params, res.params, cfg)
    # each process counted the rows it fed; process 0 takes the union
    seen = distributed.gather_bytes(f"tokens/{arm.name}/{base.seed}/{seed}", counter.ids_bytes())
    if not distributed.is_main():
        return {"arm": arm.name, "base": base.seed, "seed": int(seed), "config_hash": want}
    write_diagnose(d, udir / "diagnose", figures=cfg.diagnose.unit_figures)
    variants = footprint_variants(d.summary, d.rows)
    fp = variants["all"]
    if not curve or curve[-1]["step"] != res.step:
        curve.append({"step": int(res.step), **fp})
    t1 = time.perf_counter()
    ev = evaluate(base.model_cfg, res.params, base.tokenizer, eval_sets, cfg.evals)
    t_eval = time.perf_counter() - t1
    tokens = TokenCounter.union_count(seen) if counter.complete else distinct_tokens(  # a resumed run saw only its last batches
        tcfg.data, base.tokenizer, seq_len=tcfg.train.seq_len, batch_size=tcfg.train.batch_size, seed=tcfg.seed,
        steps=steps)
    record = {
        "arm": arm.name, "base": base.seed, "seed": int(seed), "config_hash": want,
        "narrow": ev.get("narrow", {}), "broad": ev.get("broad", {}), "perplexity": ev.get("perplexity", {}),
        "items": ev["items"], "passages": ev["passages"], "distinct_tokens": tokens, "data_budget": budget,
        **({"lm_eval": ev["lm_eval"]} if "lm_eval" in ev else {}),
        "footprint": fp, "footprint_variants": variants,
        "footprint_by_module": _plain({k: v.get("energy_share") for k, v in (d.summary.get("by_module") or {}).items()
                                       if isinstance(v, Mapping)}),
        "footprint_curve": curve,
        "train_curve": [{"step": int(m["step"]), "loss": float(m["loss"])} for m in res.metrics if "loss" in m],
        "matrices": _matrices(d.rows),
        "timing_s": {"train": t_train, "eval": t_eval, "total": time.perf_counter() - t0},
    }
    atomic_write_json(udir / RECORD, _plain(record))
    _log(f"{arm.name} base {base.seed} seed {seed}: narrow {_score(record, 'narrow')}, broad {_score(record, 'broad')}, "
         f"blocks-only entropy {variants['blocks_only'].get('entropy', float('nan')):.3f}, {tokens} distinct tokens "
         f"({record['timing_s']['total']:.1f}s)")
    return record


def _score(rec: Mapping, section: str) -> str:
    v = (rec.get(section) or {}).get("score")
    return "n/a" if v is None else f"{v:.3f}"


# ---------------------------------------------------------------- the seed noise floor

def _delta_fro(rows, *, blocks_only: bool) -> float:
    vals = [float(r["delta_fro"]) ** 2 for r in rows
            if r.get("delta_fro") is not None and not (blocks_only and r.get("module") in NON_BLOCK_MODULES)]
    return float(np.sqrt(np.sum(vals))) if vals else float("nan")


def _pair_footprint(cfg: StudyConfig, path: Path, a_dir: Path, b_dir: Path, key: Mapping[str, Any]) -> dict:
    """The footprint of W_a - W_b (two fine-tunes of one base), cached at `path` by the runs' config hashes."""
    want = config_hash(dict(key))
    cached = _read_json(path)
    if cached is not None and cached.get("config_hash") == want:
        return cached
    _, wa = load_pretrained(str(a_dir / "run"))
    _, wb = load_pretrained(str(b_dir / "run"))
    d = diagnose(wb, wa, cfg)  # "base" = b, so the delta is W_a - W_b
    if d is None:  # a process other than 0 of a multi-process run: it took part, process 0 keeps the result
        return {}
    variants = footprint_variants(d.summary, d.rows)
    flat = {f"{'footprint' if v == 'all' else 'footprint_' + v}.{k}": x for v, m in variants.items() for k, x in m.items()}
    rec = {"config_hash": want, "footprint": flat,
           "delta_fro_total": _delta_fro(d.rows, blocks_only=False),
           "delta_fro_blocks_only": _delta_fro(d.rows, blocks_only=True)}
    atomic_write_json(path, _plain(rec))
    return rec


def _mean_of(recs: list[dict]) -> dict:
    keys = sorted({k for r in recs for k in r["footprint"]})
    fp = {k: float(np.mean([r["footprint"][k] for r in recs if r["footprint"].get(k) is not None])) for k in keys}
    return {"pairs": len(recs), "footprint": fp,
            "delta_fro_total": float(np.mean([r["delta_fro_total"] for r in recs])),
            "delta_fro_blocks_only": float(np.mean([r["delta_fro_blocks_only"] for r in recs]))}


def _by_base(recs: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in sorted(recs, key=lambda r: (r["base"], r["seed"])):
        out.setdefault(int(r["base"]), []).append(r)
    return out


def noise_floor(cfg: StudyConfig, out: Path, records: Mapping[str, list[dict]]) -> dict:
    """Seed-versus-seed deltas within one arm and base, and the same seed pairs across two claim arms.

    Per base, disjoint pairs of consecutive seeds (s0, s1), (s2, s3), ... (`analysis.noise_floor_pairs`
    of them): the floor diagnoses W_arm,s0 - W_arm,s1; `between_arms` diagnoses W_coverage,s0 -
    W_ref,s1, so both sides differ in seed (and so in data order) and the arm is the only extra
    difference. Returns {"arms": {ARM: floor}, "between_arms": {"A - B": distance, "over_floor_*"}}.
    """
    pairs_per = cfg.analysis.noise_floor_pairs
    roles = cfg.claims
    names = [n for n in dict.fromkeys([roles.aligned, roles.coverage, roles.token_matched, roles.plain,
                                       roles.repeated, roles.dedup]) if n in records]
    if not pairs_per or not names:
        return {}

    def pairs(arm_a: str, arm_b: str) -> list[dict]:
        b_runs = _by_base(records[arm_b])
        recs = []
        for b, rs in _by_base(records[arm_a]).items():
            others = b_runs.get(b, [])
            for k in range(min(pairs_per, len(rs) // 2, len(others) // 2)):
                ra, rb = rs[2 * k], others[2 * k + 1]
                where = arm_a if arm_a == arm_b else f"{arm_a}-vs-{arm_b}"
                path = safe_join(out, "noise_floor", where, f"base{b}", f"seed{ra['seed']}-seed{rb['seed']}.json")
                recs.append(_pair_footprint(cfg, path, unit_dir(out, arm_a, b, ra["seed"]),
                                            unit_dir(out, arm_b, b, rb["seed"]),
                                            {"a": ra["config_hash"], "b": rb["config_hash"]}))
        return recs

    # Every process runs the same pairs in the same order (each diagnose is split across processes);
    # only process 0 gets their footprints (the others' records are empty) and aggregates them.
    co = roles.coverage
    per_arm = {arm: pairs(arm, arm) for arm in names}
    between = {ref: pairs(co, ref) for ref in (roles.aligned, roles.token_matched)
               if ref != co and per_arm.get(co) and per_arm.get(ref)}
    if not distributed.is_main():
        return {}
    floor: dict[str, Any] = {"arms": {a: _mean_of(recs) for a, recs in per_arm.items() if recs}, "between_arms": {}}
    for ref, recs in between.items():
        if recs:
            entry = _mean_of(recs)
            for kind in ("blocks_only", "total"):
                fl = [floor["arms"][a][f"delta_fro_{kind}"] for a in (co, ref)]
                entry[f"over_floor_{kind}"] = entry[f"delta_fro_{kind}"] / float(np.mean(fl))
            floor["between_arms"][f"{co} - {ref}"] = entry
    return floor


# ---------------------------------------------------------------- the whole study

def run_study(cfg: StudyConfig, out_dir: str, *, study: str, title: str, rehearsal: Mapping[str, Any] | None = None) -> dict:
    out = check_output_dir(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    arms = cfg.active_arms()
    first = cfg.arm_config(arms[0], cfg.seeds[0])
    tokenizer = get_tokenizer(first.data)
    eval_sets = build_eval_sets(cfg, first.data, tokenizer)
    extra = {"evals": to_dict(cfg.evals), "diagnose": to_dict(cfg.diagnose)}
    records: dict[str, list[dict]] = {a.name: [] for a in arms}
    base_evals: dict[int, dict] = {}
    base_curves: dict[int, list[dict]] = {}
    n_units = sum(len(cfg.arm_units(a)) for a in arms)
    uses: dict[str, int] = {}
    for a in arms:
        for _, s in cfg.arm_units(a):
            k = StreamCache.key(cfg.arm_config(a, s))
            uses[k] = uses.get(k, 0) + 1
    streams = StreamCache(uses)
    done = 0
    for b in cfg.base.base_seeds():
        todo = [(a, s) for a in arms for (bb, s) in cfg.arm_units(a) if bb == b]
        if not todo:
            continue
        base = prepare_base(cfg, out, tokenizer, b)
        base_curves[b] = base.curve
        if distributed.is_main():  # evaluation runs on process 0's devices only
            eval_path = base_dir(out, b) / "eval.json"
            ev = _read_json(eval_path)
            if ev is None or ev.get("source") != base.source:
                ev = {"source": base.source, **evaluate(base.model_cfg, base.params, tokenizer, eval_sets, cfg.evals)}
                atomic_write_json(eval_path, ev)
            base_evals[b] = ev
        for arm, seed in todo:
            records[arm.name].append(run_unit(cfg, base, arm, seed, out, eval_sets, extra, streams))
            done += 1
            if done % 5 == 0 or done == n_units:
                _log(f"{done}/{n_units} fine-tunes done ({time.perf_counter() - t_start:.0f}s)")
    floor = noise_floor(cfg, out, records)
    if not distributed.is_main():
        return {}
    results = fin.build_results(cfg, records, study=study, base_evals=base_evals, eval_sets=eval_sets,
                                floor=floor, wall_s=time.perf_counter() - t_start, rehearsal=rehearsal)
    fin.write_outputs(cfg, out, results, records, base_evals=base_evals, eval_sets=eval_sets,
                      base_curves=base_curves, title=title)
    _log(f"study done in {time.perf_counter() - t_start:.1f}s: {out / 'results.json'}")
    return results
