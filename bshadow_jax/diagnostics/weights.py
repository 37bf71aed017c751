"""`spectrum`: per-matrix spectra of the weights themselves (one checkpoint), with WeightWatcher-compatible metrics."""
from __future__ import annotations

from typing import Any

import numpy as np

from bshadow_jax.diagnostics import footprint, plan, registry, stacks
from bshadow_jax.diagnostics.powerlaw import mp_fit, ww_metrics_from_sv
from bshadow_jax.diagnostics.results import ID_COLS, SPECTRUM_COLS, WW_COLS, SpectrumResult, collect_rows
from bshadow_jax.errors import UserError


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
    mesh, nd, chunks, first_len = plan.plan_chunks(items, mesh, budget_mb, copies=2)
    user_cols = [m.name for m in registry.registered_metrics()]
    metric_cols = list(SPECTRUM_COLS) + user_cols
    rows, spectra = [], {}
    with plan.progress_bar(len(items), progress, "spectrum") as bar:
        for chunk, (w,), finite in plan.iter_chunks(chunks, src, prefetch_limit_bytes=budget_mb * 2**20):
            pad = plan.chunk_pad_size(len(chunk), first_len[tuple(chunk[0].shape)], nd)
            res = stacks.single_stack(w, topk=topk, method=method, mesh=mesh, eig_backend=eig_backend, pad_to=pad)
            del w  # before the generator reads the next chunk
            collect_rows(chunk, res, finite, metric_cols, rows, spectra, skipped, extra=_ww)
            bar.update(len(chunk))
    if not rows:
        raise UserError(f"{path}: no analysable matrix (all {len(skipped)} candidates skipped)")
    cols = list(ID_COLS) + metric_cols
    summary = {
        "kind": "spectrum",
        "checkpoint": str(path),
        "sources": {"checkpoint": plan.describe_source(src)},
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
        plan.check_item(item, src)
        return _spectrum_source(src, **kw)
