"""diagnose / spectrum pipelines (in-memory pytrees or streamed checkpoints) and their CLI handlers."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bshadow_jax import fileio
from bshadow_jax.diagnostics import footprint, names, plan, registry, stacks
from bshadow_jax.diagnostics import mesh as meshlib
from bshadow_jax.diagnostics.powerlaw import mp_fit, ww_metrics_from_sv
from bshadow_jax.diagnostics.report import write_report
from bshadow_jax.diagnostics.spectral import SV_METRICS
from bshadow_jax.errors import UserError, refuse_pickle
from bshadow_jax.formats.hub import looks_like_hub_id
from bshadow_jax.formats.layout import parse_layer_axis

ID_COLS = ("name", "component", "layer", "module", "expert", "rows", "cols")
DELTA_SV_COLS = tuple(f"delta_{m}" for m in SV_METRICS if m != "fro")
# new delta columns go at the end of this block (docs/outputs.md#metricscsv-columns-diagnose)
DIAGNOSE_COLS = ("base_fro", "delta_fro", "rel_delta") + DELTA_SV_COLS + (
    "energy_share", "base_overlap", "intruder_count", "subspace_rotation", "cosine", "update_sparsity",
    "update_sparsity_bf16")
VECTOR_CSV_COLS = ("name", "component", "layer", "module", "size", "base_norm", "delta_norm", "rel_delta", "cosine",
                   "update_sparsity", "update_sparsity_bf16")
WW_COLS = ("alpha", "log_norm", "log_spectral_norm", "alpha_weighted", "xmin", "D", "num_spikes", "mp_softrank")
SPECTRUM_COLS = SV_METRICS + WW_COLS
INT_COLS = {"delta_energy_rank_90", "delta_energy_rank_99", "energy_rank_90", "energy_rank_99", "intruder_count",
            "num_spikes"}


@dataclasses.dataclass
class DiagnoseResult:
    rows: list[dict]
    summary: dict
    spectra: dict  # row name -> singular values of the delta (descending, numpy)
    vectors: list[dict] = dataclasses.field(default_factory=list)  # vectors.csv rows (1-D tensors)


@dataclasses.dataclass
class SpectrumResult:
    rows: list[dict]
    summary: dict
    spectra: dict  # row name -> singular values of the weight


def _plan_chunks(items, mesh, budget_mb, *, copies: int):
    """(mesh, device count, chunks under the memory budget, first chunk length per shape).

    Every later chunk of a shape is padded to its first chunk's length: one compile per shape.
    """
    mesh = meshlib.default_mesh(mesh)
    nd = meshlib.mesh_size(mesh)
    chunks = plan.chunk_items(items, budget_mb=budget_mb, n_devices=nd, per_matrix_copies=copies)
    first_len: dict[tuple, int] = {}
    for c in chunks:
        first_len.setdefault(tuple(c[0].shape), len(c))
    return mesh, nd, chunks, first_len


def _collect_rows(chunk, res, finite, metric_cols, rows, spectra, skipped, extra=None) -> None:
    """One CSV row (and one spectrum) per matrix of a computed chunk (a stacks.PairStackResult or
    SingleStackResult); non-finite ones are skipped."""
    for i, it in enumerate(chunk):
        if not finite[i]:
            skipped.append({"name": it.name, "reason": "non-finite values (NaN/inf)"})
            continue
        row = plan.row_labels(it)
        for c in metric_cols:
            if c in res.columns:
                row[c] = _num(res.columns[c][i], c)
        if extra is not None:
            row.update(extra(res.sv[i], it))
        rows.append(row)
        spectra[it.name] = np.asarray(res.sv[i])


def _num(x, col):
    v = float(x)
    if col in INT_COLS and math.isfinite(v):
        return int(round(v))
    return v


def _progress(total: int, enabled: bool | None, desc: str):
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else (not enabled)
    return tqdm(total=total, disable=disable, unit="matrix", desc=desc, file=sys.stderr)


# ------------------------------------------------------------------------------------------
# diagnose
# ------------------------------------------------------------------------------------------

def _rel(num: float, den: float) -> float:
    """num / den; 0 when both are 0; +inf when only den is (rel_delta's rule)."""
    if den > 0:
        return num / den
    return math.inf if num > 0 else 0.0


def vector_row(name: str, b, t) -> dict:
    """One vectors.csv row: norms, cosine and sparsities of a 1-D tensor pair, in float64."""
    import ml_dtypes

    b32, t32 = np.asarray(b, np.float32).reshape(-1), np.asarray(t, np.float32).reshape(-1)
    b64, t64 = b32.astype(np.float64), t32.astype(np.float64)
    nb, nt, nd = (float(np.linalg.norm(x)) for x in (b64, t64, t64 - b64))
    if nb > 0 and nt > 0:
        # as kernels.elementwise: 1 - (|t - b|^2 - (|b| - |t|)^2) / (2 |b| |t|), exactly 1 when equal
        cos = float(np.clip(1.0 - (nd * nd - (nb - nt) ** 2) / (2.0 * nb * nt), -1.0, 1.0))
    else:
        cos = 1.0 if nb == nt else 0.0
    p = names.parse_name(name)
    same16 = t32.astype(ml_dtypes.bfloat16) == b32.astype(ml_dtypes.bfloat16)
    return {"name": name, "component": p["component"], "layer": p["layer"], "module": p["module"],
            "size": int(b32.size), "base_norm": nb, "delta_norm": nd, "rel_delta": _rel(nd, nb), "cosine": cos,
            "update_sparsity": float(np.mean(t32 == b32)) if b32.size else 1.0,
            "update_sparsity_bf16": float(np.mean(same16)) if b32.size else 1.0}


def _vector_rows(base_src, tuned_src, skipped: list[dict], rename) -> tuple[list[dict], list[dict]]:
    """vectors.csv rows for the 1-D tensors the plan skipped, and the skipped list without them.

    A 1-D base tensor with a tuned partner (after --rename) of the same shape gets a row and
    leaves `skipped`; without one it stays there as "missing in tuned" or "shape mismatch".
    """
    rules = names.parse_rename(rename)
    tuned_map: dict[str, str] = {}
    for tn in tuned_src.names():
        tuned_map.setdefault(names.apply_rename(tn, rules), tn)
    base_names = set(base_src.names())
    rows, keep = [], []
    for s in skipped:
        n = s["name"]
        bshape = tuple(base_src.shape(n)) if n in base_names else ()
        if len(bshape) != 1:
            keep.append(s)
            continue
        tn = tuned_map.get(n)
        tshape = None if tn is None else tuple(tuned_src.shape(tn))
        if tshape is None:
            keep.append({"name": n, "reason": "missing in tuned"})
        elif tshape != bshape:
            keep.append({"name": n, "reason": f"shape mismatch: base {list(bshape)} vs tuned {list(tshape)}"})
        else:
            b, t = base_src.read(n), tuned_src.read(tn)
            if not (np.isfinite(np.asarray(b, np.float32)).all() and np.isfinite(np.asarray(t, np.float32)).all()):
                keep.append({"name": n, "reason": "non-finite values (NaN/inf)"})
            else:
                rows.append(vector_row(n, b, t))
    return rows, keep


def _diagnose_sources(base_src, tuned_src, *, topk=8, mesh=None, rename=(), include=None, exclude=None,
                      method="auto", budget_mb=512.0, progress=None, eig_backend="auto",
                      metrics="all") -> DiagnoseResult:
    if int(topk) < 1:
        raise UserError(f"--topk {topk}: must be at least 1")
    if metrics not in stacks.METRICS_MODES:
        raise UserError(f"--metrics {metrics}: must be 'all' or 'values'")
    items, skipped = plan.plan_pairs(base_src, tuned_src, rename=rename, include=include, exclude=exclude)
    bpath, tpath = getattr(base_src, "path", "<base>"), getattr(tuned_src, "path", "<tuned>")
    if not items:
        filt = " (after --include/--exclude)" if include or exclude else ""
        raise UserError(f"{bpath} vs {tpath}: no matrix in common{filt}{_why_none(base_src, tuned_src, skipped)}")
    mesh, nd, chunks, first_len = _plan_chunks(items, mesh, budget_mb, copies=6)
    user_cols = [f"delta_{m.name}" for m in registry.registered_metrics()]
    metric_cols = list(DIAGNOSE_COLS) + user_cols
    rows, spectra = [], {}
    redo_sv = redo_intr = redo_vec = 0
    with _progress(len(items), progress, "diagnose") as bar:
        for chunk, (b, t), finite in plan.iter_chunks(chunks, base_src, tuned_src,
                                                          prefetch_limit_bytes=budget_mb * 2**20):
            pad = plan.chunk_pad_size(len(chunk), first_len[tuple(chunk[0].shape)], nd)
            res = stacks.pair_stack(b, t, topk=topk, method=method, mesh=mesh, eig_backend=eig_backend, pad_to=pad,
                                    metrics=metrics)
            del b, t  # before the generator reads the next chunk
            redo_sv += int(np.sum(res.redo_sv))
            redo_intr += int(np.sum(res.redo_intruders))
            redo_vec += int(np.sum(res.redo_vectors)) if res.redo_vectors is not None else 0
            _collect_rows(chunk, res, finite, metric_cols, rows, spectra, skipped)
            bar.update(len(chunk))
    if not rows:
        raise UserError(f"{bpath} vs {tpath}: no comparable matrix (all {len(skipped)} candidates skipped)")
    energy = np.array([r["delta_fro"] ** 2 for r in rows], np.float64)
    total = float(energy.sum())
    for r, e in zip(rows, energy):
        r["energy_share"] = float(e / total) if total > 0 else 0.0
    cols = list(ID_COLS) + [c for c in metric_cols]
    for r in rows:  # fixed column order
        for c in cols:
            r.setdefault(c, None)
    group_cols = [c for c in metric_cols if c != "energy_share"]
    fp = footprint.footprint_stats([r["energy_share"] for r in rows])
    fp["total_delta_energy"] = total
    vectors, skipped = _vector_rows(base_src, tuned_src, skipped, rename)
    summary = {
        "kind": "diagnose",
        "base": str(bpath),
        "tuned": str(tpath),
        "topk": int(topk),
        "method": method,
        "metrics": metrics,
        "not_computed": list(stacks.VECTOR_COLUMNS) if metrics == "values" else [],
        "matrices": len(rows),
        "vectors": len(vectors),
        "columns": cols,
        "footprint": fp,
        "footprint_blocks_only": footprint.blocks_only(rows),
        "footprint_per_parameter": footprint.per_parameter(rows),
        "by_layer": footprint.group_means(rows, "layer", group_cols),
        "by_module": footprint.group_means(rows, "module", group_cols),
        "by_component": footprint.group_means(rows, "component", group_cols),
        "skipped": skipped,
        "recomputed_exact": {"singular_values": redo_sv, "intruders": redo_intr, "vectors": redo_vec},
    }
    return DiagnoseResult(rows=[{c: r[c] for c in cols} for r in rows], summary=summary, spectra=spectra,
                          vectors=vectors)


def _why_none(base_src, tuned_src, skipped) -> str:
    """Why two trees have no matrix in common: the first shape mismatch, or no name in common."""
    for s in skipped:
        if s["reason"].startswith("shape mismatch: "):
            return f"; tensor {s['name']}: {s['reason'][len('shape mismatch: '):]}"
    bn, tn = base_src.names(), tuned_src.names()
    if bn and tn and not set(bn) & set(tn):
        return f" (no tensor name in common: base has e.g. {bn[0]}, tuned has e.g. {tn[0]})"
    return ""


def diagnose(base_params: Any, tuned_params: Any, *, topk: int = 8, mesh=None, rename=(), include=None,
             exclude=None, method: str = "auto", budget_mb: float = 512.0, progress=False,
             eig_backend: str = "auto", layer_axis=(), layout: str | None = None,
             metrics: str = "all") -> DiagnoseResult:
    """Delta metrics of two in-memory parameter pytrees.

    Args:
        base_params, tuned_params: the two pytrees (nested or flat dicts of arrays, flax linen
            `{"params": ...}`, FrozenDict, nnx State or its pure dict); matrices are paired by name.
        topk: K of base_overlap and of the top-k delta metrics.
        mesh: device mesh to shard the stacks over (default: every local device).
        rename: --rename rules ("OLD=NEW" or pairs) applied to tuned names.
        include, exclude: regexes (strings or compiled) on tensor names.
        method: "auto", "svd" or "gram" (stacks.resolve_method).
        budget_mb: memory budget of one stack of matrices.
        progress: show a progress bar (None: when stderr is a terminal).
        eig_backend: "auto", "host" or "jax" (stacks.use_host).
        layer_axis: "REGEX=AXIS" rules (or (regex, axis) pairs): leaves whose name matches hold
            one matrix per layer along AXIS (formats.layout).
        layout: a named set of layer-axis rules ("maxtext").
        metrics: "all" (every column) or "values": only what the delta's singular values and
            norms give; base_overlap, intruder_count and subspace_rotation are NaN (empty in
            metrics.csv) and W_base / W_tuned are never decomposed.

    Returns:
        DiagnoseResult (rows, summary, spectra, vectors: the vectors.csv rows of 1-D tensors).
    """
    with plan.open_source(base_params, name="<base>", layer_axis=layer_axis, layout=layout) as b, \
            plan.open_source(tuned_params, name="<tuned>", layer_axis=layer_axis, layout=layout) as t:
        return _diagnose_sources(b, t, topk=topk, mesh=mesh, rename=rename, include=include, exclude=exclude,
                                 method=method, budget_mb=budget_mb, progress=progress, eig_backend=eig_backend,
                                 metrics=metrics)


def diagnose_checkpoints(base_path, tuned_path, *, item: str | None = None, layer_axis=(), layout: str | None = None,
                         **kw) -> DiagnoseResult:
    """diagnose() streaming two checkpoints tensor by tensor.

    Args:
        base_path, tuned_path: checkpoint files or folders (diagnostics.plan.open_source).
        item: the item of multi-item orbax steps to read (both sides).
        layer_axis, layout: as in diagnose().
        **kw: diagnose()'s other keyword arguments.

    Returns:
        DiagnoseResult.
    """
    opts = dict(item=item, layer_axis=layer_axis, layout=layout)
    with plan.open_source(base_path, **opts) as b, plan.open_source(tuned_path, **opts) as t:
        _check_item(item, b, t)
        return _diagnose_sources(b, t, **kw)


def _check_item(item: str | None, *sources) -> None:
    """An --item that no source had a multi-item step to pick from is a mistake, not a no-op."""
    if item is not None and not any(getattr(s, "item_applied", False) for s in sources):
        paths = " and ".join(str(getattr(s, "path", "?")) for s in sources)
        raise UserError(f"{paths}: --item {item}: no multi-item orbax step to pick it from")


# ------------------------------------------------------------------------------------------
# spectrum
# ------------------------------------------------------------------------------------------

def _ww(sv, item) -> dict:
    sv = np.asarray(sv, np.float64)
    m = ww_metrics_from_sv(sv)
    m.update(mp_fit(sv * sv, max(item.shape), min(item.shape)))
    return {c: float(m[c]) for c in WW_COLS}


def _spectrum_source(src, *, topk=8, mesh=None, include=None, exclude=None, method="auto", budget_mb=512.0,
                     progress=None, eig_backend="auto") -> SpectrumResult:
    if int(topk) < 1:
        raise UserError(f"--topk {topk}: must be at least 1")
    items, skipped = plan.plan_single(src, include=include, exclude=exclude)
    path = getattr(src, "path", "<memory>")
    if not items:
        raise UserError(f"{path}: no matrix to analyse")
    mesh, nd, chunks, first_len = _plan_chunks(items, mesh, budget_mb, copies=2)
    user_cols = [m.name for m in registry.registered_metrics()]
    metric_cols = list(SPECTRUM_COLS) + user_cols
    rows, spectra = [], {}
    with _progress(len(items), progress, "spectrum") as bar:
        for chunk, (w,), finite in plan.iter_chunks(chunks, src, prefetch_limit_bytes=budget_mb * 2**20):
            pad = plan.chunk_pad_size(len(chunk), first_len[tuple(chunk[0].shape)], nd)
            res = stacks.single_stack(w, topk=topk, method=method, mesh=mesh, eig_backend=eig_backend, pad_to=pad)
            del w  # before the generator reads the next chunk
            _collect_rows(chunk, res, finite, metric_cols, rows, spectra, skipped, extra=_ww)
            bar.update(len(chunk))
    if not rows:
        raise UserError(f"{path}: no analysable matrix (all {len(skipped)} candidates skipped)")
    cols = list(ID_COLS) + metric_cols
    summary = {
        "kind": "spectrum",
        "checkpoint": str(path),
        "topk": int(topk),
        "method": method,
        "matrices": len(rows),
        "columns": cols,
        "by_layer": footprint.group_means(rows, "layer", metric_cols),
        "by_module": footprint.group_means(rows, "module", metric_cols),
        "by_component": footprint.group_means(rows, "component", metric_cols),
        "skipped": skipped,
    }
    return SpectrumResult(rows=[{c: r.get(c) for c in cols} for r in rows], summary=summary, spectra=spectra)


def spectrum(params_or_path: Any, *, item: str | None = None, layer_axis=(), layout: str | None = None,
             **kw) -> SpectrumResult:
    """Per-matrix spectra and metrics (incl. WeightWatcher-compatible ones) of one pytree or checkpoint.

    Args:
        params_or_path: a parameter pytree, or a checkpoint path (diagnostics.plan.open_source).
        item, layer_axis, layout: as in diagnose_checkpoints().
        **kw: topk, mesh, include, exclude, method, budget_mb, progress, eig_backend as in diagnose().

    Returns:
        SpectrumResult (rows, summary, spectra).
    """
    with plan.open_source(params_or_path, item=item, layer_axis=layer_axis, layout=layout) as src:
        _check_item(item, src)
        return _spectrum_source(src, **kw)


# ------------------------------------------------------------------------------------------
# outputs
# ------------------------------------------------------------------------------------------

def finite_or_none(obj):
    """`obj` with every non-finite float (NaN, inf) as None, recursively: what JSON can hold."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (np.floating,)):
        return finite_or_none(float(obj))
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def rows_to_csv(rows: list[dict], cols: list[str], empty=()) -> str:
    """CSV text of `rows` in column order `cols` (floats as repr, None as empty; the columns in
    `empty` are written empty whatever they hold: columns that were not computed)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None or c in empty else (repr(r[c]) if isinstance(r[c], float) else r[c])
                    for c in cols])
    return buf.getvalue()


def write_outputs(result, out_dir) -> Path:
    """metrics.csv, summary.json, report (md + PNG) and, for diagnose, vectors.csv into out_dir, atomically.

    Args:
        result: a DiagnoseResult or SpectrumResult.
        out_dir: the output folder (replaced as a whole; see fileio.check_output_dir).

    Returns:
        The output folder.
    """
    kind = result.summary.get("kind", "diagnose")
    out = fileio.check_output_dir(out_dir)
    with fileio.atomic_output_dir(out) as tmp:
        fileio.atomic_write_text(tmp / "metrics.csv", rows_to_csv(result.rows, result.summary["columns"],
                                                                  empty=result.summary.get("not_computed", ())))
        if kind == "diagnose":
            fileio.atomic_write_text(tmp / "vectors.csv", rows_to_csv(getattr(result, "vectors", []), VECTOR_CSV_COLS))
        fileio.atomic_write_json(tmp / "summary.json", finite_or_none(result.summary))
        write_report(tmp, result.rows, result.summary, result.spectra, kind=kind)
    return Path(out)


write_diagnose_outputs = write_outputs
write_spectrum_outputs = write_outputs


# ------------------------------------------------------------------------------------------
# CLI handlers (argument definitions: diagnostics/cli.py)
# ------------------------------------------------------------------------------------------

def _check_inputs(*paths) -> None:
    """Fail on a pickle or a missing path before anything compiles (hub ids are resolved when opened)."""
    for p in paths:
        refuse_pickle(p)
        if not os.path.exists(p) and not looks_like_hub_id(p):
            raise UserError(f"{p}: no such file or folder")


def _layout_args(args) -> dict:
    """--item, --layer-axis, --layout (checked before anything is read)."""
    parse_layer_axis(args.layer_axis, args.layout)
    return {"item": args.item, "layer_axis": args.layer_axis, "layout": args.layout}


def diagnose_cli(args) -> int:
    fileio.check_output_dir(args.out)
    _check_inputs(args.base, args.tuned)
    if args.batch_budget_mb <= 0:
        raise UserError(f"--batch-budget-mb {args.batch_budget_mb}: must be positive")
    fileio.enable_compilation_cache()
    res = diagnose_checkpoints(args.base, args.tuned, topk=args.topk, rename=args.rename, include=args.include,
                               exclude=args.exclude, budget_mb=args.batch_budget_mb, progress=None,
                               metrics=args.metrics, **_layout_args(args))
    write_outputs(res, args.out)
    fp = res.summary["footprint"]
    print(f"{args.out}: {len(res.rows)} matrices, {len(res.vectors)} vectors, {len(res.summary['skipped'])} skipped; "
          f"footprint entropy "
          f"{fp['entropy']:.3f}, gini {fp['gini']:.3f}, matrices_for_90pct {fp['matrices_for_90pct']:.3f}")
    return 0


def spectrum_cli(args) -> int:
    fileio.check_output_dir(args.out)
    _check_inputs(args.ckpt)
    if args.batch_budget_mb <= 0:
        raise UserError(f"--batch-budget-mb {args.batch_budget_mb}: must be positive")
    fileio.enable_compilation_cache()
    res = spectrum(args.ckpt, topk=args.topk, include=args.include, exclude=args.exclude,
                   budget_mb=args.batch_budget_mb, progress=None, **_layout_args(args))
    write_outputs(res, args.out)
    print(f"{args.out}: {len(res.rows)} matrices, {len(res.summary['skipped'])} skipped")
    return 0
