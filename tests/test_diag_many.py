"""One base against several fine-tunes: each pair's result is exactly the single-pair diagnosis, the
base is decomposed once (host paths), and the CLI writes every pair's folder and the comparison."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from bshadow_jax.cli import main
from bshadow_jax.diagnostics import host, host_partial, run
from bshadow_jax.models import LlamaConfig, init_params, save_pretrained

CFG = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    import jax

    root = tmp_path_factory.mktemp("many")
    base = jax.tree.map(np.asarray, init_params(CFG, jax.random.key(0)))
    save_pretrained(CFG, base, root / "base")
    rng = np.random.default_rng(1)
    paths = []
    for i, scale in enumerate((0.01, 0.05, 0.2)):
        tuned = jax.tree.map(lambda w: (w + scale * rng.standard_normal(w.shape)).astype(np.float32), base)
        paths.append(save_pretrained(CFG, tuned, root / f"ft{i}" / "final"))
    return root / "base", paths


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_each_pair_equals_its_own_diagnosis_and_the_base_is_decomposed_once(checkpoints, method, monkeypatch):
    base, tuned = checkpoints
    calls = {"base": 0}
    real_partial, real_exact = host_partial._base_task, host._base_svd

    def count(real):
        def f(*a, **k):
            calls["base"] += 1
            return real(*a, **k)
        return f

    monkeypatch.setattr(host_partial, "_base_task", count(real_partial))
    monkeypatch.setattr(host, "_base_svd", count(real_exact))
    many = run.diagnose_many(base, tuned, method=method, eig_backend="host", topk=4)
    base_calls = calls["base"]
    n_matrices = len(many[0].rows)
    assert base_calls == n_matrices  # once per base matrix, not once per pair
    for t, res in zip(tuned, many):
        alone = run.diagnose_checkpoints(base, t, method=method, eig_backend="host", topk=4)
        assert res.summary == alone.summary
        assert [r["name"] for r in res.rows] == [r["name"] for r in alone.rows]
        for a, b in zip(res.rows, alone.rows):
            assert a == pytest.approx(b, nan_ok=True), a["name"]
    assert calls["base"] - base_calls == 3 * n_matrices  # each single-pair run decomposes the base again


def test_cli_writes_each_pair_and_the_comparison(checkpoints, tmp_path, capsys):
    base, tuned = checkpoints
    out = tmp_path / "diag"
    assert main(["diagnose", str(base), *map(str, tuned), "--out", str(out)]) == 0, capsys.readouterr().err
    labels = ["ft0_final", "ft1_final", "ft2_final"]  # equal last components take their parent's name
    for lab in labels:
        assert {p.name for p in (out / lab).iterdir()} >= {"metrics.csv", "summary.json", "vectors.csv", "report.md"}
    with open(out / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["label"] for r in rows] == labels
    rel = [float(r["mean_rel_delta"]) for r in rows]
    assert rel[0] < rel[1] < rel[2]  # the fine-tunes moved by growing amounts
    # a failing fine-tune leaves no partial output (one error line, exit 2)
    bad = tmp_path / "bad"
    rc = main(["diagnose", str(base), str(tuned[0]), str(tmp_path / "missing"), "--out", str(bad)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and not bad.exists()
