"""Parameter-space diagnostics: spectral and rank metrics of weights and fine-tuning deltas.

    from bshadow_jax import diagnostics
    m = diagnostics.spectral_metrics(sv)                  # dict of scalars, jittable/vmappable
    res = diagnostics.diagnose(base_params, tuned_params) # DiagnoseResult(rows, summary, spectra)
    diagnostics.write_diagnose_outputs(res, "out/")       # metrics.csv, summary.json, report.md + PNGs

    @diagnostics.register_metric("top1_share")            # jitted, vmapped, sharded for you
    def top1_share(sv):
        return sv[0] ** 2 / jnp.maximum(jnp.sum(sv ** 2), 1e-30)

Attributes load lazily: `bshadow --help` imports this package without importing jax.
"""
from __future__ import annotations

from bshadow_jax.lazy import lazy_exports

_EXPORTS = {
    "spectral_metrics": "bshadow_jax.diagnostics.spectral",
    "spectral_metrics_stack": "bshadow_jax.diagnostics.spectral",
    "SV_METRICS": "bshadow_jax.diagnostics.spectral",
    "register_metric": "bshadow_jax.diagnostics.registry",
    "unregister_metric": "bshadow_jax.diagnostics.registry",
    "temporary_metric": "bshadow_jax.diagnostics.registry",
    "registered_metrics": "bshadow_jax.diagnostics.registry",
    "parse_name": "bshadow_jax.diagnostics.names",
    "register_name_rule": "bshadow_jax.diagnostics.names",
    "NameRule": "bshadow_jax.diagnostics.names",
    "NAME_RULES": "bshadow_jax.diagnostics.names",
    "COMPONENT_RULES": "bshadow_jax.diagnostics.names",
    "parse_rename": "bshadow_jax.diagnostics.names",
    "apply_rename": "bshadow_jax.diagnostics.names",
    "compile_filter": "bshadow_jax.diagnostics.names",
    "footprint_stats": "bshadow_jax.diagnostics.footprint",
    "group_means": "bshadow_jax.diagnostics.footprint",
    "diagnose": "bshadow_jax.diagnostics.run",
    "diagnose_checkpoints": "bshadow_jax.diagnostics.run",
    "diagnose_many": "bshadow_jax.diagnostics.run",
    "spectrum": "bshadow_jax.diagnostics.weights",
    "write_diagnose_outputs": "bshadow_jax.diagnostics.results",
    "write_spectrum_outputs": "bshadow_jax.diagnostics.results",
    "write_outputs": "bshadow_jax.diagnostics.results",
    "DiagnoseResult": "bshadow_jax.diagnostics.results",
    "SpectrumResult": "bshadow_jax.diagnostics.results",
    "write_comparison": "bshadow_jax.diagnostics.compare",
    "pair_stack": "bshadow_jax.diagnostics.stacks",
    "single_stack": "bshadow_jax.diagnostics.stacks",
    "sv_metrics": "bshadow_jax.diagnostics.stacks",
    "PairStackResult": "bshadow_jax.diagnostics.stacks",
    "SingleStackResult": "bshadow_jax.diagnostics.stacks",
}

__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
