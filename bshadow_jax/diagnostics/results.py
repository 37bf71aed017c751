"""What diagnose and spectrum produce: their columns, result types, the rows of a computed chunk, and the
output files (metrics.csv, vectors.csv, summary.json, report.md; docs/outputs.md#diagnose-output)."""
from __future__ import annotations

import csv
import dataclasses
import io
import math
from pathlib import Path

import numpy as np

from bshadow_jax import fileio
from bshadow_jax.diagnostics import plan
from bshadow_jax.diagnostics.report import write_report
from bshadow_jax.diagnostics.spectral import SV_METRICS

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



def collect_rows(chunk, res, finite, metric_cols, rows, spectra, skipped, extra=None) -> None:
    """One CSV row (and one spectrum) per matrix of a computed chunk (a stacks.PairStackResult or
    SingleStackResult); non-finite ones are skipped."""
    for i, it in enumerate(chunk):
        if not finite[i]:
            skipped.append({"name": it.name, "reason": "non-finite values (NaN/inf)"})
            continue
        row = plan.row_labels(it)
        for c in metric_cols:
            if c in res.columns:
                row[c] = cell_value(res.columns[c][i], c)
        if extra is not None:
            row.update(extra(res.sv[i], it))
        rows.append(row)
        spectra[it.name] = np.asarray(res.sv[i])


def cell_value(x, col):
    v = float(x)
    if col in INT_COLS and math.isfinite(v):
        return int(round(v))
    return v




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
    out = fileio.check_output_dir(out_dir)
    with fileio.atomic_output_dir(out) as tmp:
        write_result_files(result, tmp)
    return Path(out)


def write_result_files(result, folder: Path) -> None:
    """The files of one result into an existing (temporary) folder; write_outputs makes it atomic."""
    kind = result.summary.get("kind", "diagnose")
    fileio.atomic_write_text(folder / "metrics.csv", rows_to_csv(result.rows, result.summary["columns"],
                                                                 empty=result.summary.get("not_computed", ())))
    if kind == "diagnose":
        fileio.atomic_write_text(folder / "vectors.csv", rows_to_csv(getattr(result, "vectors", []), VECTOR_CSV_COLS))
    fileio.atomic_write_json(folder / "summary.json", finite_or_none(result.summary))
    if result.summary.get("probe") is not None:
        fileio.atomic_write_json(folder / "probe.json", finite_or_none(result.summary["probe"]))
    write_report(folder, result.rows, result.summary, result.spectra, kind=kind)


write_diagnose_outputs = write_outputs
write_spectrum_outputs = write_outputs
