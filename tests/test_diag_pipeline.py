"""diagnose/spectrum pipelines on in-memory pytrees and on safetensors files through the CLI."""
import csv
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from bshadow_jax import diagnostics
from bshadow_jax.cli import main
from bshadow_jax.diagnostics import plan as readers_plan
from bshadow_jax.diagnostics import registry, run
from bshadow_jax.errors import UserError
from bshadow_jax.formats.pytree import flatten as flatten_tree
from bshadow_jax.formats.sources import DictSource

D, F, V, L = 8, 16, 20, 2


def llama_params(rng, layers=L):
    def lin(o, i):
        return {"weight": rng.standard_normal((o, i)).astype(np.float32)}

    return {
        "model": {
            "embed_tokens": {"weight": rng.standard_normal((V, D)).astype(np.float32)},
            "layers": {
                str(i): {
                    "self_attn": {"q_proj": lin(D, D), "k_proj": lin(D // 2, D)},
                    "mlp": {"up_proj": lin(F, D), "down_proj": lin(D, F)},
                    "input_layernorm": {"weight": np.ones(D, np.float32)},
                }
                for i in range(layers)
            },
            "norm": {"weight": np.ones(D, np.float32)},
        },
        "lm_head": {"weight": rng.standard_normal((V, D)).astype(np.float32)},
    }


def perturb(params, rng, scale=0.1):
    flat = {k: np.array(v) for k, v in flatten_tree(params).items()}
    for k, v in flat.items():
        if v.ndim == 2:
            flat[k] = v + scale * rng.standard_normal(v.shape).astype(np.float32)
    return flat


def test_diagnose_pytrees_rows_and_summary():
    rng = np.random.default_rng(0)
    base = llama_params(rng)
    tuned = perturb(base, rng)  # flat dict vs nested dict: both accepted
    res = diagnostics.diagnose(base, tuned, topk=3)
    n_matrices = 2 + 4 * L
    assert len(res.rows) == n_matrices
    assert res.summary["columns"][:7] == ["name", "component", "layer", "module", "expert", "rows", "cols"]
    assert list(res.rows[0]) == res.summary["columns"]
    shares = [r["energy_share"] for r in res.rows]
    assert sum(shares) == pytest.approx(1.0, abs=1e-9)
    for r in res.rows:
        d = np.asarray(tuned[r["name"]], np.float64) - flatten_tree(base)[r["name"]]
        assert r["delta_fro"] == pytest.approx(np.linalg.norm(d), rel=1e-5)
        assert r["delta_spectral_norm"] == pytest.approx(np.linalg.norm(d, 2), rel=1e-4)
    # 1-D tensors (norms) are measured in vectors.csv, no longer skipped
    assert not res.summary["skipped"]
    assert {v["name"] for v in res.vectors} == {"model.norm.weight"} | {
        f"model.layers.{i}.input_layernorm.weight" for i in range(L)}
    fp = res.summary["footprint"]
    assert 0 < fp["entropy"] <= 1 and 0 <= fp["gini"] < 1 and 0 < fp["matrices_for_90pct"] <= 1
    assert set(res.summary["by_layer"]) == {"0", "1", "none"}
    assert res.summary["by_module"]["q_proj"]["matrices"] == L
    assert res.summary["by_component"]["language_model"]["energy_share"] == pytest.approx(1.0)
    assert set(res.spectra) == {r["name"] for r in res.rows}


def test_skipped_reasons_and_no_common():
    rng = np.random.default_rng(1)
    base = {"a.weight": rng.standard_normal((4, 6)), "b.weight": rng.standard_normal((4, 6)),
            "c.weight": rng.standard_normal((4, 6)), "only_base.weight": rng.standard_normal((3, 3)),
            "nan.weight": rng.standard_normal((4, 6))}
    tuned = {"a.weight": base["a.weight"] + 1, "b.weight": rng.standard_normal((6, 4)),
             "c.weight": base["c.weight"], "only_tuned.weight": rng.standard_normal((3, 3)),
             "nan.weight": np.full((4, 6), np.nan)}
    res = diagnostics.diagnose(base, tuned)
    reasons = {s["name"]: s["reason"] for s in res.summary["skipped"]}
    assert "shape mismatch" in reasons["b.weight"]
    assert reasons["only_base.weight"] == "missing in tuned"
    assert reasons["only_tuned.weight"] == "missing in base"
    assert "non-finite" in reasons["nan.weight"]
    assert [r["name"] for r in res.rows] == ["a.weight", "c.weight"]
    with pytest.raises(UserError, match="no matrix in common"):
        diagnostics.diagnose({"x.weight": np.ones((2, 2))}, {"y.weight": np.ones((2, 2))})
    with pytest.raises(UserError, match="no matrix in common"):
        diagnostics.diagnose(base, tuned, include="^zzz")


def test_moe_slices_include_exclude_rename():
    rng = np.random.default_rng(2)
    experts = rng.standard_normal((3, 6, 4)).astype(np.float32)
    base = {"model.layers.0.mlp.experts.gate_up_proj": experts,
            "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((4, 4)).astype(np.float32)}
    tuned = {"model.language_model.layers.0.mlp.experts.gate_up_proj": experts + 1.0,
             "model.language_model.layers.0.self_attn.q_proj.weight": base["model.layers.0.self_attn.q_proj.weight"],
             "model.vision_tower.layers.0.fc.weight": np.ones((2, 2), np.float32)}
    res = diagnostics.diagnose(base, tuned, rename=["model.language_model.=model."], exclude="q_proj")
    assert [(r["name"], r["expert"], r["module"], r["layer"]) for r in res.rows] == [
        (f"model.layers.0.mlp.experts.gate_up_proj[{e}]", e, "gate_up_proj", 0) for e in range(3)]
    assert all(r["rows"] == 6 and r["cols"] == 4 for r in res.rows)
    for r in res.rows:  # a constant +1 delta is rank one
        assert r["delta_energy_rank_99"] == 1
        assert r["delta_fro"] == pytest.approx(np.sqrt(24), rel=1e-6)
    assert {s["reason"] for s in res.summary["skipped"]} == {"missing in base"}


def test_registry_custom_metrics_in_csv(tmp_path):
    rng = np.random.default_rng(3)
    base = llama_params(rng, layers=1)
    tuned = perturb(base, rng)

    def top1_share(sv):
        return sv[0] ** 2 / jnp.maximum(jnp.sum(sv**2), 1e-30)

    def max_abs(w):
        return jnp.max(jnp.abs(w))

    with registry.temporary_metric("top1_share", top1_share), \
            registry.temporary_metric("max_abs", max_abs, kind="matrix"):
        res = diagnostics.diagnose(base, tuned)
        diagnostics.write_diagnose_outputs(res, tmp_path / "out")
        spec = diagnostics.spectrum(base)
    assert not registry.registered_metrics()
    with open(tmp_path / "out" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert "delta_top1_share" in rows[0] and "delta_max_abs" in rows[0]
    flat_b = flatten_tree(base)
    for r in rows:
        d = np.asarray(tuned[r["name"]], np.float64) - flat_b[r["name"]]
        sv = np.linalg.svd(d, compute_uv=False)
        assert float(r["delta_top1_share"]) == pytest.approx(sv[0] ** 2 / np.sum(sv**2), rel=1e-4)
        assert float(r["delta_max_abs"]) == pytest.approx(np.max(np.abs(d)), rel=1e-5)
    for r in spec.rows:
        assert "top1_share" in r and "max_abs" in r and "alpha" in r
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["footprint"]["matrices"] == len(rows)
    assert (tmp_path / "out" / "report.md").exists()


def _write_pair(tmp_path, rng, layers=1):
    from safetensors.numpy import save_file

    base = flatten_tree(llama_params(rng, layers))
    tuned = perturb(base, rng)
    save_file({k: np.ascontiguousarray(v) for k, v in base.items()}, str(tmp_path / "base.safetensors"))
    save_file({k: np.ascontiguousarray(v) for k, v in tuned.items()}, str(tmp_path / "tuned.safetensors"))
    return base, tuned


def test_cli_end_to_end_and_bad_inputs(tmp_path, capsys):
    rng = np.random.default_rng(4)
    base, tuned = _write_pair(tmp_path, rng)
    b, t, out = tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", tmp_path / "diag"
    assert main(["diagnose", str(b), str(t), "--out", str(out), "--topk", "4"]) == 0
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 + 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["topk"] == 4 and summary["matrices"] == 6
    for r in rows:
        d = tuned[r["name"]].astype(np.float64) - base[r["name"]]
        assert float(r["delta_fro"]) == pytest.approx(np.linalg.norm(d), rel=1e-5)
    # same weights on both sides: zero delta everywhere
    assert main(["diagnose", str(b), str(b), "--out", str(tmp_path / "same")]) == 0
    with open(tmp_path / "same" / "metrics.csv") as f:
        assert all(float(r["delta_fro"]) == 0.0 for r in csv.DictReader(f))
    assert main(["spectrum", str(b), "--out", str(tmp_path / "spec")]) == 0
    assert (tmp_path / "spec" / "metrics.csv").exists()
    capsys.readouterr()

    # no tensor in common -> exit 2, one error line, no output left
    from safetensors.numpy import save_file

    save_file({"other.weight": np.ones((3, 3), np.float32)}, str(tmp_path / "other.safetensors"))
    bad_out = tmp_path / "bad"
    assert main(["diagnose", str(b), str(tmp_path / "other.safetensors"), "--out", str(bad_out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "no matrix in common" in err
    assert not bad_out.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".bad")]
    # output path is an existing file
    (tmp_path / "afile").write_text("x")
    assert main(["diagnose", str(b), str(t), "--out", str(tmp_path / "afile")]) == 2
    assert "afile" in capsys.readouterr().err
    # pickle, missing, garbage
    (tmp_path / "w.bin").write_bytes(b"\x80\x04")
    assert main(["diagnose", str(tmp_path / "w.bin"), str(t), "--out", str(bad_out)]) == 2
    assert main(["diagnose", str(tmp_path / "nope.safetensors"), str(t), "--out", str(bad_out)]) == 2
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    assert main(["diagnose", str(tmp_path / "garbage.safetensors"), str(t), "--out", str(bad_out)]) == 2
    assert "garbage.safetensors" in capsys.readouterr().err
    assert not bad_out.exists()
    # an existing good output survives a failed run
    assert main(["diagnose", str(b), str(tmp_path / "other.safetensors"), "--out", str(out)]) == 2
    assert (out / "metrics.csv").exists()


def test_streamed_checkpoint_above_exact_size_takes_host_partial_path_and_matches_exact(tmp_path):
    """k > SMALL_K_EXACT: `auto` streams safetensors through the partial host eigensolvers; the
    rows must equal the exact three-SVD path's, a registered matrix metric included."""
    from safetensors.numpy import save_file

    from bshadow_jax.diagnostics import stacks

    rng = np.random.default_rng(11)
    shapes = {"model.layers.0.mlp.up_proj.weight": (300, 160), "model.layers.0.mlp.down_proj.weight": (160, 300),
              "model.layers.1.self_attn.q_proj.weight": (160, 160)}
    assert all(min(s) > stacks.SMALL_K_EXACT for s in shapes.values())
    base = {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in shapes.items()}
    tuned = {n: w + (rng.standard_normal((w.shape[0], 3)) @ rng.standard_normal((3, w.shape[1])) * 0.02
                     + 1e-4 * rng.standard_normal(w.shape)).astype(np.float32) for n, w in base.items()}
    save_file(base, str(tmp_path / "base.safetensors"))
    save_file(tuned, str(tmp_path / "tuned.safetensors"))

    @diagnostics.register_metric("abs_max_test", kind="matrix")
    def abs_max(w):
        return jnp.max(jnp.abs(w))

    try:
        fast = run.diagnose_checkpoints(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors")
        exact = run.diagnose_checkpoints(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", method="svd")
    finally:
        registry.unregister_metric("abs_max_test")
    assert fast.summary["method"] == "auto" and len(fast.rows) == 3
    by_name = {r["name"]: r for r in exact.rows}
    for r in fast.rows:
        e = by_name[r["name"]]
        for c, v in r.items():
            if isinstance(v, float):
                np.testing.assert_allclose(v, e[c], rtol=2e-4, atol=1e-4, err_msg=f"{r['name']} {c}")
            else:
                assert v == e[c], (r["name"], c)
    assert any(r["delta_abs_max_test"] > 0 for r in fast.rows)


def test_chunk_reads_are_batched_by_bytes_and_match_single_reads(monkeypatch):
    """Sources with read_many get 2-D tensors in batches of at most READ_BATCH_BYTES; stacks equal read()."""
    rng = np.random.default_rng(5)
    flat = {f"w{i}": rng.standard_normal((16, 8)).astype(np.float32) for i in range(7)}
    flat["experts"] = rng.standard_normal((3, 16, 8)).astype(np.float32)
    calls = []

    class Batched(DictSource):
        def read_many(self, names):
            calls.append(list(names))
            return [self.read(n) for n in names]

    monkeypatch.setattr(readers_plan, "READ_BATCH_BYTES", 3 * 16 * 8 * 4)  # three matrices a call
    chunk = [readers_plan.Item(n, n, n, None, (16, 8)) for n in sorted(k for k in flat if k != "experts")]
    chunk[3:3] = [readers_plan.Item(f"experts[{e}]", "experts", "experts", e, (16, 8)) for e in range(3)]
    (got,), finite = readers_plan.load_chunk(chunk, Batched(flat))
    want = np.stack([flat[it.base_name] if it.index is None else flat["experts"][it.index] for it in chunk])
    np.testing.assert_array_equal(got, want)
    assert finite.all()
    # w0-w2 in one call; each expert slice alone (read(), through the 3-D cache); then w3-w5, then w6 alone
    assert calls == [["w0", "w1", "w2"], ["w3", "w4", "w5"]]
