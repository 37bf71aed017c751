"""The diagnose pipeline (in-memory pytrees or streamed checkpoints; one base against one or several
fine-tunes) and the CLI handlers of diagnose and spectrum."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bshadow_jax import fileio
from bshadow_jax.diagnostics import footprint, plan, registry, stacks
from bshadow_jax.diagnostics.compare import unique_labels, write_comparison
from bshadow_jax.diagnostics.results import (DIAGNOSE_COLS, ID_COLS, DiagnoseResult, collect_rows, write_outputs,
                                            write_result_files)
from bshadow_jax.diagnostics.weights import spectrum
from bshadow_jax.diagnostics.vectors import vector_rows
from bshadow_jax.errors import UserError, refuse_pickle
from bshadow_jax.evals.probe import probe_many, read_probe_text
from bshadow_jax.formats.hub import looks_like_hub_id
from bshadow_jax.formats.layout import parse_layer_axis

# ------------------------------------------------------------------------------------------
# diagnose
# ------------------------------------------------------------------------------------------

class _Pair:
    """One (base, tuned) pair of a diagnosis: its plan, and the rows as its chunks are computed."""

    def __init__(self, base_src, tuned_src, *, rename, include, exclude):
        self.base, self.tuned = base_src, tuned_src
        self.items, self.skipped = plan.plan_pairs(base_src, tuned_src, rename=rename, include=include,
                                                   exclude=exclude)
        self.bpath, self.tpath = getattr(base_src, "path", "<base>"), getattr(tuned_src, "path", "<tuned>")
        if not self.items:
            filt = " (after --include/--exclude)" if include or exclude else ""
            raise UserError(f"{self.bpath} vs {self.tpath}: no matrix in common{filt}"
                            f"{_why_none(base_src, tuned_src, self.skipped)}")
        self.rows: list[dict] = []
        self.spectra: dict = {}
        self.redo = {"singular_values": 0, "intruders": 0, "vectors": 0}

    def add(self, chunk, res, finite, metric_cols) -> None:
        self.redo["singular_values"] += int(np.sum(res.redo_sv))
        self.redo["intruders"] += int(np.sum(res.redo_intruders))
        self.redo["vectors"] += int(np.sum(res.redo_vectors)) if res.redo_vectors is not None else 0
        collect_rows(chunk, res, finite, metric_cols, self.rows, self.spectra, self.skipped)

    def finish(self, *, topk: int, method: str, metrics: str, metric_cols, rename) -> DiagnoseResult:
        rows = self.rows
        if not rows:
            raise UserError(f"{self.bpath} vs {self.tpath}: no comparable matrix "
                            f"(all {len(self.skipped)} candidates skipped)")
        energy = np.array([r["delta_fro"] ** 2 for r in rows], np.float64)
        total = float(energy.sum())
        for r, e in zip(rows, energy):
            r["energy_share"] = float(e / total) if total > 0 else 0.0
        cols = list(ID_COLS) + list(metric_cols)
        for r in rows:  # fixed column order
            for c in cols:
                r.setdefault(c, None)
        group_cols = [c for c in metric_cols if c != "energy_share"]
        fp = footprint.footprint_stats([r["energy_share"] for r in rows])
        fp["total_delta_energy"] = total
        vectors, skipped = vector_rows(self.base, self.tuned, self.skipped, rename)
        summary = {
            "kind": "diagnose",
            "base": str(self.bpath),
            "tuned": str(self.tpath),
            "sources": {"base": plan.describe_source(self.base), "tuned": plan.describe_source(self.tuned)},
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
            "recomputed_exact": dict(self.redo),
        }
        return DiagnoseResult(rows=[{c: r[c] for c in cols} for r in rows], summary=summary, spectra=self.spectra,
                              vectors=vectors)


def _diagnose_sources(base_src, tuned_srcs: Sequence, *, topk=8, mesh=None, rename=(), include=None, exclude=None,
                      method="auto", budget_mb=512.0, progress=None, eig_backend="auto",
                      metrics="all") -> list[DiagnoseResult]:
    """One DiagnoseResult per tuned source. Fine-tunes whose plans agree (the usual case: the same
    tensors) form one group: each base chunk is read once for the whole group, and on the host
    paths the base's decompositions are computed once and shared (stacks.pair_stack base_cache).
    A matrix with non-finite values in any checkpoint of a group is skipped in every pair of it."""
    if int(topk) < 1:
        raise UserError(f"--topk {topk}: must be at least 1")
    if metrics not in stacks.METRICS_MODES:
        raise UserError(f"--metrics {metrics}: must be 'all' or 'values'")
    pairs = [_Pair(base_src, t, rename=rename, include=include, exclude=exclude) for t in tuned_srcs]
    groups: dict[tuple, list[_Pair]] = {}
    for p in pairs:
        groups.setdefault(tuple(p.items), []).append(p)
    metric_cols = list(DIAGNOSE_COLS) + [f"delta_{m.name}" for m in registry.registered_metrics()]
    # Several processes (bshadow_jax.distributed): chunk j is read and computed by process j % N over its
    # own devices, and process 0 adds every chunk's result in the single-process order; the others return [].
    me, n_proc = _process_slot()
    done: list[tuple[int, int, Any, np.ndarray]] = []  # (chunk number, pair number, result, finite)
    j = 0
    with plan.progress_bar(sum(len(p.items) for p in pairs), progress, "diagnose") as bar:
        for items, group in groups.items():
            mesh_, nd, chunks, first_len = plan.plan_chunks(list(items), mesh, budget_mb, copies=5 + len(group))
            numbers = list(range(j, j + len(chunks)))
            j += len(chunks)
            mine = [(k, c) for k, c in zip(numbers, chunks) if k % n_proc == me]
            sources = [base_src] + [p.tuned for p in group]
            loaded = plan.iter_chunks([c for _, c in mine], *sources, prefetch_limit_bytes=budget_mb * 2**20)
            for (k, _), (chunk, (b, *ts), finite) in zip(mine, loaded):
                pad = plan.chunk_pad_size(len(chunk), first_len[tuple(chunk[0].shape)], nd)
                cache: dict = {}  # this base chunk's decompositions, shared by the group's fine-tunes
                for p, t in zip(group, ts):
                    res = stacks.pair_stack(b, t, topk=topk, method=method, mesh=mesh_, eig_backend=eig_backend,
                                            pad_to=pad, metrics=metrics, base_cache=cache if len(group) > 1 else None)
                    if n_proc == 1:
                        p.add(chunk, res, finite, metric_cols)
                    else:
                        done.append((k, pairs.index(p), res, finite))
                    bar.update(len(chunk))
                del b, ts, cache  # before the generator reads the next chunk
    if n_proc > 1:
        if not _gather_chunks(done, pairs, groups, metric_cols, mesh, budget_mb):
            return []
    return [p.finish(topk=topk, method=method, metrics=metrics, metric_cols=metric_cols, rename=rename)
            for p in pairs]


def _process_slot() -> tuple[int, int]:
    import jax

    return jax.process_index(), jax.process_count()


def _gather_chunks(done, pairs, groups, metric_cols, mesh, budget_mb) -> bool:
    """Send this process's chunk results to process 0, which adds all of them in chunk order (True there)."""
    import io

    from bshadow_jax import distributed

    arrays: dict[str, np.ndarray] = {}
    for k, pi, res, finite in done:
        key = f"{k}/{pi}"
        arrays[f"{key}/finite"] = np.asarray(finite)
        arrays[f"{key}/sv"] = np.asarray(res.sv)
        for name in ("redo_sv", "redo_intruders", "redo_vectors"):
            value = getattr(res, name)
            if value is not None:
                arrays[f"{key}/{name}"] = np.asarray(value)
        for c, v in res.columns.items():
            arrays[f"{key}/col/{c}"] = np.asarray(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # plain arrays: no pickle crosses the coordinator
    payloads = distributed.gather_bytes("diagnose", buf.getvalue())
    if payloads is None:
        return False
    results: dict[tuple[int, int], dict] = {}
    for payload in payloads:
        with np.load(io.BytesIO(payload), allow_pickle=False) as z:
            for name in z.files:
                k, pi, rest = name.split("/", 2)
                results.setdefault((int(k), int(pi)), {})[rest] = z[name]
    j = 0
    for items, group in groups.items():
        _, _, chunks, _ = plan.plan_chunks(list(items), mesh, budget_mb, copies=5 + len(group))
        for chunk in chunks:
            for p in group:
                got = results[(j, pairs.index(p))]
                cols = {c[len("col/"):]: v for c, v in got.items() if c.startswith("col/")}
                res = stacks.PairStackResult(columns=cols, sv=got["sv"], redo_sv=got.get("redo_sv"),
                                             redo_intruders=got.get("redo_intruders"),
                                             redo_vectors=got.get("redo_vectors"))
                p.add(chunk, res, got["finite"], metric_cols)
            j += 1
    return True


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
        DiagnoseResult (rows, summary, spectra, vectors: the vectors.csv rows of 1-D tensors). In a
        multi-process job every process must call it (the matrices are split across processes) and only
        process 0 gets the result; the others get None.
    """
    with plan.open_source(base_params, name="<base>", layer_axis=layer_axis, layout=layout) as b, \
            plan.open_source(tuned_params, name="<tuned>", layer_axis=layer_axis, layout=layout) as t:
        res = _diagnose_sources(b, [t], topk=topk, mesh=mesh, rename=rename, include=include, exclude=exclude,
                                method=method, budget_mb=budget_mb, progress=progress, eig_backend=eig_backend,
                                metrics=metrics)
        return res[0] if res else None


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
    return diagnose_many(base_path, [tuned_path], item=item, layer_axis=layer_axis, layout=layout, **kw)[0]


def diagnose_many(base_path, tuned_paths: Sequence, *, item: str | None = None, layer_axis=(),
                  layout: str | None = None, **kw) -> list[DiagnoseResult]:
    """One base against several fine-tunes, streamed: the base is read and decomposed once.

    Args:
        base_path: the base checkpoint.
        tuned_paths: the fine-tuned checkpoints (files, folders or hub ids).
        item, layer_axis, layout: as in diagnose_checkpoints().
        **kw: diagnose()'s other keyword arguments.

    Returns:
        One DiagnoseResult per fine-tune, in order; each is what diagnose_checkpoints() gives for
        that pair alone.
    """
    opts = dict(item=item, layer_axis=layer_axis, layout=layout)
    with contextlib.ExitStack() as stack:
        b = stack.enter_context(plan.open_source(base_path, **opts))
        ts = [stack.enter_context(plan.open_source(t, **opts)) for t in tuned_paths]
        plan.check_item(item, b, *ts)
        return _diagnose_sources(b, ts, **kw)


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


def _summary_line(where, res) -> str:
    fp = res.summary["footprint"]
    return (f"{where}: {len(res.rows)} matrices, {len(res.vectors)} vectors, {len(res.summary['skipped'])} skipped; "
            f"footprint entropy {fp['entropy']:.3f}, gini {fp['gini']:.3f}, "
            f"matrices_for_90pct {fp['matrices_for_90pct']:.3f}")


def diagnose_cli(args) -> int:
    tuned = list(args.tuned)
    out = fileio.check_output_dir(args.out)
    _check_inputs(args.base, *tuned)
    if args.batch_budget_mb <= 0:
        raise UserError(f"--batch-budget-mb {args.batch_budget_mb}: must be positive")
    if args.probe is not None:
        read_probe_text(args.probe)  # a missing or empty text fails before anything is computed
        if args.probe_seq_len < 1:
            raise UserError(f"--probe-seq-len {args.probe_seq_len}: must be at least 1")
    fileio.enable_compilation_cache()
    results = diagnose_many(args.base, tuned, topk=args.topk, rename=args.rename, include=args.include,
                            exclude=args.exclude, budget_mb=args.batch_budget_mb, progress=None,
                            metrics=args.metrics, **_layout_args(args))
    if not results:  # a process other than 0 of a multi-process run: its chunks went to process 0, which writes
        return 0
    if args.probe is not None:
        for res, probed in zip(results, probe_many(args.base, tuned, args.probe, seq_len=args.probe_seq_len)):
            res.summary["probe"] = probed
    if len(results) == 1:
        write_outputs(results[0], out)
        print(_summary_line(args.out, results[0]))
        return 0
    labels = unique_labels(tuned)
    with fileio.atomic_output_dir(out) as tmp:  # every pair's folder and the comparison, or nothing
        for label, res in zip(labels, results):
            (tmp / label).mkdir()
            write_result_files(res, tmp / label)
        write_comparison(tmp, str(args.base), labels, results)
    for label, res in zip(labels, results):
        print(_summary_line(Path(args.out) / label, res))
    print(f"{args.out}: comparison of {len(results)} fine-tunes in comparison.md and comparison.csv")
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
