"""Other JAX stacks' checkpoints and in-memory flax params: flax linen, flax nnx, a MaxText-like
scanned layout, written with orbax here; kernels analysed as [out, in]; --item, --layer-axis,
--layout maxtext; and every bad input as one `error:` line, exit 2, no output folder.
"""
from __future__ import annotations

import contextlib
import csv
import io
import shutil
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bshadow_jax import diagnostics
from bshadow_jax.formats.layout import view_of
from bshadow_jax.formats.sources import open_checkpoint

EMB, L, H, D, MLP, V = 6, 3, 2, 4, 10, 12


def _cli(argv) -> tuple[int, str]:
    from bshadow_jax import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _rows(out: Path) -> list[dict]:
    return list(csv.DictReader(open(out / "metrics.csv", newline="")))


def _save(path: Path, tree) -> Path:
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path.absolute(), tree)
    ckpt.wait_until_finished()
    return path


def _save_manager(root: Path, steps: dict[int, dict]) -> Path:
    """A CheckpointManager folder; steps: {step: {item name: tree}}."""
    names = tuple(next(iter(steps.values())))
    mgr = ocp.CheckpointManager(root.absolute(), item_names=names)
    for step, items in steps.items():
        mgr.save(step, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()}))
    mgr.wait_until_finished()
    mgr.close()
    return root


def _as_hf(rows: list[dict]) -> list[dict]:
    """Rows with `kernel` spelled `weight` in names, to compare against HF-style references."""
    return [{**r, "name": r["name"].replace(".kernel", ".weight"), "module": r["module"].replace(".kernel", ".weight")}
            for r in rows]


def _same_metrics(a: list[dict], b: list[dict]) -> None:
    """Rows of two results agree: the same names and labels, every metric column within float32 error.

    Order aside: in-memory trees keep their insertion order, checkpoints come in layer order."""
    a, b = sorted(a, key=lambda r: r["name"]), sorted(b, key=lambda r: r["name"])
    assert [r["name"] for r in a] == [r["name"] for r in b]
    for ra, rb in zip(a, b):
        for c in ra:
            x, y = ra[c], rb[c]
            if isinstance(x, float) and isinstance(y, float):
                assert np.isclose(x, y, rtol=2e-3, atol=1e-5, equal_nan=True), (ra["name"], c, x, y)
            else:
                assert x == y, (ra["name"], c, x, y)


# ----------------------------------------------------------------------------- flax linen

def _linen(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"Dense_0": {"kernel": f(EMB, MLP), "bias": f(MLP)},
            "layers_1": {"mlp": {"wi": {"kernel": f(MLP, EMB)}}}}


def _train_state(params: dict) -> dict:
    """A flax TrainState as orbax stores it: params beside optimizer moments and a step counter."""
    return {"params": params, "opt_state": {"mu": params, "nu": params, "count": np.int32(7)}, "step": np.int32(7)}


def _hf_like(params: dict) -> dict:
    """The same weights as Hugging Face [out, in] tensors (`weight`, not `kernel`: nothing is transposed)."""
    return {"Dense_0.weight": params["Dense_0"]["kernel"].T, "Dense_0.bias": params["Dense_0"]["bias"],
            "layers_1.mlp.wi.weight": params["layers_1"]["mlp"]["wi"]["kernel"].T}


@pytest.fixture(scope="module")
def linen(tmp_path_factory):
    root = tmp_path_factory.mktemp("linen")
    base, tuned, older = _linen(0), _linen(0), _linen(5)
    tuned["Dense_0"]["kernel"] = tuned["Dense_0"]["kernel"] + 0.3 * _linen(1)["Dense_0"]["kernel"]
    tuned["layers_1"]["mlp"]["wi"]["kernel"] = tuned["layers_1"]["mlp"]["wi"]["kernel"] + 0.1
    _save(root / "base", _train_state(base))
    # a CheckpointManager step of two items, neither called params; step 2 is the latest finished
    _save_manager(root / "mgr", {1: {"state": _train_state(older), "ema": older},
                                 2: {"state": _train_state(tuned), "ema": base}})
    half = root / "mgr" / "3.orbax-checkpoint-tmp-1700000000"  # a later save that never finished
    shutil.copytree(root / "mgr" / "2", half)
    unmarked = root / "mgr" / "5"  # a step folder whose commit markers were never written
    shutil.copytree(root / "mgr" / "1", unmarked)
    for m in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        (unmarked / m).unlink()
    return root, base, tuned


def test_linen_params_only_kernels_transposed_and_item(linen, tmp_path):
    root, base, tuned = linen
    out = tmp_path / "out"
    assert _cli(["diagnose", str(root / "base"), str(root / "mgr"), "--item", "state", "--out", str(out)])[0] == 0
    rows = _rows(out)
    assert [r["name"] for r in rows] == ["Dense_0.kernel", "layers_1.mlp.wi.kernel"]  # no opt_state, no step
    assert [(r["rows"], r["cols"]) for r in rows] == [(str(MLP), str(EMB)), (str(EMB), str(MLP))]  # [out, in]
    assert [r["layer"] for r in rows] == ["", "1"] and rows[1]["module"] == "wi"
    import json
    skipped = json.loads((out / "summary.json").read_text())["skipped"]
    assert skipped == []  # the bias is a 1-D tensor: measured in vectors.csv, not skipped
    assert (out / "vectors.csv").read_text().splitlines()[1].startswith("Dense_0.bias,")
    # the rows are those of the same weights given as HF [out, in] tensors
    with open_checkpoint(root / "mgr", item="state") as src:
        assert src.kind == "orbax" and sorted(src.names()) == ["Dense_0.bias", "Dense_0.kernel",
                                                               "layers_1.mlp.wi.kernel"]
        np.testing.assert_array_equal(src.read("Dense_0.kernel"), tuned["Dense_0"]["kernel"])  # the latest finished step
    got = diagnostics.diagnose_checkpoints(root / "base", root / "mgr", item="state")
    ref = diagnostics.diagnose(_hf_like(base), _hf_like(tuned))
    _same_metrics(_as_hf(got.rows), ref.rows)
    # a step whose items are `params` and `opt_state`: params is picked without --item
    _save_manager(tmp_path / "mgr2", {1: {"opt_state": {"mu": tuned}, "params": tuned}})
    _same_metrics(diagnostics.diagnose_checkpoints(root / "base", tmp_path / "mgr2").rows, got.rows)
    # in memory: linen variables, a FrozenDict, a TrainState-like dict give the same rows
    from flax.core import FrozenDict

    for b, t in [({"params": base}, {"params": tuned}), (FrozenDict({"params": base}), FrozenDict({"params": tuned})),
                 (_train_state(base), _train_state(tuned))]:
        _same_metrics(_as_hf(diagnostics.diagnose(b, t).rows), ref.rows)


def test_kernel_transpose_changes_left_vectors():
    """The check above can fail: analysed untransposed ([in, out]), base_overlap differs."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((EMB, MLP)).astype(np.float32)
    dw = np.outer(rng.standard_normal(EMB), rng.standard_normal(MLP)).astype(np.float32)
    as_kernel = diagnostics.diagnose({"a.kernel": w}, {"a.kernel": w + dw}, topk=2).rows[0]
    as_stored = diagnostics.diagnose({"a.weight": w}, {"a.weight": w + dw}, topk=2).rows[0]
    as_hf = diagnostics.diagnose({"a.weight": w.T}, {"a.weight": (w + dw).T}, topk=2).rows[0]
    assert np.isclose(as_kernel["base_overlap"], as_hf["base_overlap"], rtol=1e-4)
    assert not np.isclose(as_kernel["base_overlap"], as_stored["base_overlap"], rtol=1e-2)
    assert (as_kernel["rows"], as_kernel["cols"]) == (MLP, EMB) == (as_hf["rows"], as_hf["cols"])


# ----------------------------------------------------------------------------- flax nnx

def _nnx_state(seed: int):
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(V, EMB, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(EMB, EMB, rngs=rngs) for _ in range(2)])
            self.head = nnx.Linear(EMB, V, rngs=rngs)

    _, state = nnx.split(Net(nnx.Rngs(seed)))
    return state


def test_nnx_state_saved_and_in_memory(tmp_path):
    import jax

    base = _nnx_state(0)
    tuned = jax.tree_util.tree_map(lambda x: x * 1.1 + 0.01, _nnx_state(0))
    _save(tmp_path / "b", base)
    _save(tmp_path / "t", tuned)
    out = tmp_path / "out"
    assert _cli(["diagnose", str(tmp_path / "b"), str(tmp_path / "t"), "--out", str(out)])[0] == 0
    rows = _rows(out)
    names = [r["name"] for r in rows]
    assert sorted(names) == ["blocks.0.kernel", "blocks.1.kernel", "embed.embedding", "head.kernel"]  # no .value
    by = {r["name"]: r for r in rows}
    assert (by["blocks.1.kernel"]["layer"], by["blocks.1.kernel"]["module"]) == ("1", "blocks")
    assert by["embed.embedding"]["module"] == "embed"
    assert (by["head.kernel"]["rows"], by["head.kernel"]["cols"]) == (str(V), str(EMB))  # transposed
    assert (by["embed.embedding"]["rows"], by["embed.embedding"]["cols"]) == (str(V), str(EMB))  # not a kernel
    from_disk = diagnostics.diagnose_checkpoints(tmp_path / "b", tmp_path / "t").rows
    _same_metrics(diagnostics.diagnose(base, tuned).rows, from_disk)  # an nnx State in memory
    _same_metrics(diagnostics.diagnose(base.to_pure_dict(), tuned.to_pure_dict()).rows, from_disk)


# ----------------------------------------------------------------------------- MaxText-like scanned layers

def _maxtext(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return {"decoder": {
        "layers": {"self_attention": {"query": {"kernel": f(EMB, L, H, D)}, "out": {"kernel": f(H, L, D, EMB)}},
                   "mlp": {"wi_0": {"kernel": f(EMB, L, MLP)}},
                   "pre_self_attention_layer_norm": {"scale": f(EMB, L)}},
        "decoder_norm": {"scale": f(EMB)}, "logits_dense": {"kernel": f(EMB, V)}},
        "token_embedder": {"embedding": f(V, EMB)}}


def _maxtext_hf(p: dict) -> dict:
    """Per-layer HF-style [out, in] matrices of a MaxText tree, named by layer."""
    lay, out = p["decoder"]["layers"], {}
    out["token_embedder.embedding"] = p["token_embedder"]["embedding"]
    for i in range(L):
        out[f"decoder.layers.{i}.self_attention.query"] = lay["self_attention"]["query"]["kernel"][:, i].reshape(
            EMB, H * D).T
        out[f"decoder.layers.{i}.self_attention.out"] = lay["self_attention"]["out"]["kernel"][:, i].reshape(
            H * D, EMB).T
        out[f"decoder.layers.{i}.mlp.wi_0"] = lay["mlp"]["wi_0"]["kernel"][:, i].T
    out["decoder.logits_dense"] = p["decoder"]["logits_dense"]["kernel"].T
    return out


@pytest.fixture(scope="module")
def maxtext(tmp_path_factory):
    root = tmp_path_factory.mktemp("maxtext")
    base, tuned = _maxtext(0), _maxtext(0)
    delta = _maxtext(1)
    tuned = {"decoder": {"layers": {k: {kk: {"kernel": v["kernel"] + 0.2 * delta["decoder"]["layers"][k][kk]["kernel"]}
                                        for kk, v in sub.items()} if k != "pre_self_attention_layer_norm" else sub
                                    for k, sub in tuned["decoder"]["layers"].items()},
                         "decoder_norm": tuned["decoder"]["decoder_norm"],
                         "logits_dense": {"kernel": tuned["decoder"]["logits_dense"]["kernel"] + 0.05}},
             "token_embedder": {"embedding": tuned["token_embedder"]["embedding"] * 1.01}}
    for name, p in [("base", base), ("tuned", tuned)]:  # MaxText's one item, `items`: a TrainState
        _save_manager(root / name, {10: {"items": {"params": {"params": p}, "opt_state": {"mu": {"params": p}},
                                                   "step": np.int32(10)}}})
    return root, base, tuned


def test_maxtext_layout_rows_per_layer(maxtext, tmp_path):
    root, base, tuned = maxtext
    out = tmp_path / "out"
    assert _cli(["diagnose", str(root / "base"), str(root / "tuned"), "--layout", "maxtext", "--out", str(out)])[0] == 0
    rows = _rows(out)
    q = [r for r in rows if r["name"].startswith("decoder.layers.self_attention.query.kernel")]
    assert [(r["name"], r["layer"], r["module"], r["expert"]) for r in q] == [
        (f"decoder.layers.self_attention.query.kernel[{i}]", str(i), "query", "") for i in range(L)]
    shapes = {r["name"].split("[")[0]: (int(r["rows"]), int(r["cols"])) for r in rows}
    assert shapes == {"decoder.layers.self_attention.query.kernel": (H * D, EMB),
                      "decoder.layers.self_attention.out.kernel": (EMB, H * D),
                      "decoder.layers.mlp.wi_0.kernel": (MLP, EMB),
                      "decoder.logits_dense.kernel": (V, EMB), "token_embedder.embedding": (V, EMB)}
    assert len(rows) == 3 * L + 2 and not any("opt_state" in r["name"] or "mu" in r["name"] for r in rows)
    import json
    skipped = {s["name"]: s["reason"] for s in json.loads((out / "summary.json").read_text())["skipped"]}
    assert skipped["decoder.layers.pre_self_attention_layer_norm.scale"] == "1-D tensor per layer (not a matrix)"
    # each slice is that layer's matrix: the same numbers as the per-layer HF-style tensors
    got = diagnostics.diagnose_checkpoints(root / "base", root / "tuned", layout="maxtext").rows
    ref = {r["name"]: r for r in diagnostics.diagnose(_maxtext_hf(base), _maxtext_hf(tuned)).rows}
    for r in got:
        stem, _, idx = r["name"].partition("[")
        key = (stem.replace("decoder.layers.", f"decoder.layers.{idx[:-1]}.") if idx else stem).removesuffix(".kernel")
        assert r["layer"] == ref[key]["layer"] and (r["rows"], r["cols"]) == (ref[key]["rows"], ref[key]["cols"])
        for c in ("delta_fro", "base_fro", "base_overlap", "intruder_count"):
            assert np.isclose(float(r[c]), float(ref[key][c]), rtol=2e-3), (r["name"], c)
    # --layer-axis spelled out is the same layout; in memory too
    same = diagnostics.diagnose_checkpoints(root / "base", root / "tuned", layer_axis=[r"^decoder\.layers\.=1"]).rows
    _same_metrics(same, got)
    _same_metrics(diagnostics.diagnose({"params": base}, {"params": tuned}, layout="maxtext").rows, got)
    spec = diagnostics.spectrum(root / "base", layer_axis=[(r"^decoder\.layers\.", 1)])
    assert [r["layer"] for r in spec.rows if "wi_0" in r["name"]] == list(range(L))


def test_dense_general_and_default_flattening():
    rng = np.random.default_rng(0)
    cases = {  # name, stored shape -> analysed shape
        ("a.self_attention.query.kernel", (EMB, H, D)): (H * D, EMB),
        ("a.self_attention.value.kernel", (EMB, H, D)): (H * D, EMB),
        ("a.self_attention.out.kernel", (H, D, EMB)): (EMB, H * D),
        ("b.CausalAttn_0.attn_out_proj.kernel", (H, D, EMB)): (EMB, H * D),
        ("c.other.kernel", (3, 5, 7)): (35, 3),  # first axis x the rest, transposed
        ("token_embedder.embedding", (V, EMB)): (V, EMB),  # not a kernel: as stored
        ("model.layers.0.mlp.up_proj.weight", (MLP, EMB)): (MLP, EMB),
        ("model.layers.0.mlp.experts.gate_up_proj", (4, EMB, MLP)): (4, EMB, MLP),  # an expert stack
    }
    for (name, stored), want in cases.items():
        v = view_of(name, stored, None)
        assert v.shape == want, name
        x = rng.standard_normal(stored).astype(np.float32)
        assert v.apply(x).shape == want
    x = rng.standard_normal((H, D, EMB)).astype(np.float32)
    np.testing.assert_array_equal(view_of("o.out.kernel", x.shape, None).apply(x), x.reshape(H * D, EMB).T)
    x = rng.standard_normal((H, L, D, EMB)).astype(np.float32)  # scanned, layer axis 1
    got = view_of("o.out.kernel", x.shape, 1).apply(x)
    assert got.shape == (L, EMB, H * D)
    np.testing.assert_array_equal(got[2], x[:, 2].reshape(H * D, EMB).T)


def test_layer_numbers_from_flax_block_names():
    from bshadow_jax.diagnostics import parse_name

    for name, layer, module in [("layers_3.mlp.wi.kernel", 3, "wi"), ("model.layers.4.self_attn.q_proj.weight", 4,
                                                                       "q_proj"),
                                ("encoder.layer_5.attention.query.kernel", 5, "query"),
                                ("blocks.6.attn.qkv.weight", 6, "qkv"), ("transformer.h.7.attn.c_attn.weight", 7,
                                                                        "c_attn"),
                                ("decoder.layers_8.self_attention.out.kernel", 8, "out")]:
        p = parse_name(name)
        assert (p["layer"], p["module"]) == (layer, module), name


# ----------------------------------------------------------------------------- bad input

def _refused(argv, tmp_path, *words) -> str:
    out = tmp_path / "out_refused"
    rc, err = _cli(argv + ["--out", str(out)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists()
    return lines[0]


def test_bad_inputs(linen, maxtext, tmp_path):
    lroot, base, _ = linen
    mroot, _, _ = maxtext
    b, t = str(mroot / "base"), str(mroot / "tuned")
    _refused(["diagnose", b, t, "--layer-axis", "nomatch=1"], tmp_path, "--layer-axis nomatch=1", "matches no tensor")
    _refused(["diagnose", b, t, "--layer-axis", r"^decoder\.layers\.=7"], tmp_path, "axis 7 is out of range",
             "decoder.layers.")
    _refused(["diagnose", b, t, "--layer-axis", "decoder"], tmp_path, "REGEX=AXIS")
    _refused(["diagnose", b, t, "--layer-axis", "decoder=one"], tmp_path, "integer")
    _refused(["diagnose", b, t, "--layout", "nope"], tmp_path, "--layout nope", "maxtext")
    _refused(["spectrum", str(lroot / "base"), "--layout", "maxtext"], tmp_path, "matches no tensor")
    # items: two, none called params, no --item; an unknown one; --item on a non-orbax checkpoint
    _refused(["diagnose", str(lroot / "base"), str(lroot / "mgr")], tmp_path, "2 orbax items (ema, state)", "--item")
    _refused(["diagnose", str(lroot / "base"), str(lroot / "mgr"), "--item", "nope"], tmp_path, "--item nope",
             "ema, state")
    from safetensors.numpy import save_file

    save_file({"a.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "w.safetensors"))
    _refused(["spectrum", str(tmp_path / "w.safetensors"), "--item", "params"], tmp_path,
             "--item params: no multi-item orbax step")
    _refused(["diagnose", str(lroot / "base"), str(lroot / "base"), "--item", "state"], tmp_path,
             "--item state: no multi-item orbax step")
    # an orbax folder with no arrays
    _save(tmp_path / "empty", {"a": {}, "b": None})
    _refused(["spectrum", str(tmp_path / "empty")], tmp_path, "no arrays", str(tmp_path / "empty"))
    # half-written: an orbax tmp folder; a step without its commit markers; a manager with no finished step
    half = tmp_path / "7.orbax-checkpoint-tmp-123"
    shutil.copytree(lroot / "base", half)
    _refused(["spectrum", str(half)], tmp_path, "half-written", "tmp folder")
    nomark = tmp_path / "nomark"
    shutil.copytree(lroot / "base", nomark)
    for m in ("commit_success.txt", "_CHECKPOINT_METADATA"):
        (nomark / m).unlink()
    _refused(["spectrum", str(nomark)], tmp_path, "half-written", "commit marker")
    mgr = tmp_path / "mgr"
    shutil.copytree(lroot / "mgr" / "2", mgr / "4.orbax-checkpoint-tmp-9")
    _refused(["spectrum", str(mgr)], tmp_path, "no finished orbax step", "4.orbax-checkpoint-tmp-9")
    # no leaf in common; the same names with other shapes (the first mismatch named)
    _save(tmp_path / "nnx", _nnx_state(0))
    _refused(["diagnose", str(lroot / "base"), str(tmp_path / "nnx")], tmp_path, "no tensor name in common")
    other = {"Dense_0": {"kernel": np.ones((EMB + 1, MLP), np.float32), "bias": base["Dense_0"]["bias"]},
             "layers_1": {"mlp": {"wi": {"kernel": np.ones((MLP, EMB + 1), np.float32)}}}}
    _save(tmp_path / "other", {"params": other})
    _refused(["diagnose", str(lroot / "base"), str(tmp_path / "other")], tmp_path,
             f"tensor Dense_0.kernel: base [{EMB}, {MLP}] vs tuned [{EMB + 1}, {MLP}]")
