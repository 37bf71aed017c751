"""Hostile checkpoints through the command line: exit code 2 with exactly one `error:` line and no
traceback, a failed run keeps the previous good output, nothing is written outside --out whatever
the tensor names, and damaged orbax run folders are refused the same way.
"""
from __future__ import annotations

import contextlib
import io
import struct
from pathlib import Path

import numpy as np

import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from reliability_helpers import assert_cli_user_error
from testkit import fuzz_settings

# the fixtures (hf_folder, gguf_bytes, tiny_model, the autouse memory_cap) are used by name
from readers_kit import (  # noqa: F401
    FUZZ, FUZZ_SMALL, HANG_SECONDS, PHASES, TINY, _PRINT_OWN_PEAK, gguf_bytes, hf_folder, memory_cap, models,
    no_hang, read_all, sources, st_bytes, st_format, tiny_model, user_error_or_ok,
)
from reliability_helpers import record  # noqa: F401


# ----------------------------------------------------------------------------- CLI sweep

def _cli(argv) -> tuple[int, str]:
    from bshadow_jax import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), no_hang(120):
        rc = cli.main(argv)
    return rc, err.getvalue()


def _broken_inputs(root: Path, hf_folder: Path, gguf_bytes: bytes) -> dict[str, Path]:
    good = (hf_folder / "model.safetensors").read_bytes()
    cases = {
        "empty.safetensors": b"",
        "truncated.safetensors": good[: len(good) // 2],
        "json_garbage.safetensors": struct.pack("<Q", 5) + b"{{{{{" + b"\0" * 8,
        "huge_len.safetensors": struct.pack("<Q", 2**63) + b"{}",
        "bad_offsets.safetensors": st_bytes({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64000]}}, b"\0" * 64),
        "empty.gguf": b"",
        "truncated.gguf": gguf_bytes[: len(gguf_bytes) // 3],
        "badmagic.gguf": b"GGUX" + gguf_bytes[4:],
        "model.bin": b"\x80\x04pickle",
        "model.pt": b"\x80\x04pickle",
        "model.pth": b"\x80\x04pickle",
        "model.ckpt": b"\x80\x04pickle",
        "weights.npz": b"PK\x03\x04",
    }
    out = {}
    for name, data in cases.items():
        (root / name).write_bytes(data)
        out[name] = root / name
    folder = root / "no_weights"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out["no_weights"] = folder
    pick = root / "pickle_folder"
    pick.mkdir()
    (pick / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    (pick / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    out["pickle_folder"] = pick
    out["missing"] = root / "does_not_exist.safetensors"
    out["run_folder_no_ckpt"] = root / "run"
    (root / "run" / "checkpoints").mkdir(parents=True)
    return out


def test_cli_broken_inputs_exit_2(hf_folder, gguf_bytes, tmp_path):
    inputs = _broken_inputs(tmp_path, hf_folder, gguf_bytes)
    results = {}
    for name, path in inputs.items():
        for argv in (["spectrum", str(path)], ["export", str(path)], ["diagnose", str(hf_folder), str(path)],
                     ["diagnose", str(path), str(hf_folder)]):
            out = tmp_path / "out" / f"{argv[0]}-{name}"
            rc, err = _cli([*argv, "--out", str(out)])
            results[(argv[0], name)] = rc
            record(f"exit {rc}", f"{argv[0]} {name}")
            line = assert_cli_user_error(rc, err, out, context=argv)
            if name.endswith((".bin", ".pt", ".pth", ".ckpt")) or name == "pickle_folder":
                assert "pickle" in line


@fuzz_settings(25, derandomize=True, suppress_health_check=list(HealthCheck), phases=PHASES)
@given(data=st.data())
def test_cli_mutated_checkpoints(hf_folder, gguf_bytes, tmp_path_factory, data):
    """Mutated safetensors/GGUF files through `bshadow spectrum` and `bshadow export`: exit 0 or 2, never more."""
    kind = data.draw(st.sampled_from(["safetensors", "gguf"]))
    buf = bytearray((hf_folder / "model.safetensors").read_bytes() if kind == "safetensors" else gguf_bytes)
    if data.draw(st.booleans()):
        buf = buf[: data.draw(st.integers(0, len(buf) - 1))]
    else:
        for _ in range(data.draw(st.integers(1, 6))):
            buf[data.draw(st.integers(0, min(len(buf) - 1, 1500)))] = data.draw(st.integers(0, 255))
    root = tmp_path_factory.mktemp("climut")
    f = root / f"model.{kind}"
    f.write_bytes(bytes(buf))
    if kind == "safetensors":
        (root / "config.json").write_bytes((hf_folder / "config.json").read_bytes())
    cmd = data.draw(st.sampled_from(["spectrum", "export"]))
    rc, err = _cli([cmd, str(f), "--out", str(root / "out")])
    record(f"exit {rc}", f"{cmd} {kind}")
    assert rc in (0, 2), err
    if rc == 2:
        assert_cli_user_error(rc, err, root / "out")


def test_failed_run_keeps_previous_good_output(hf_folder, tmp_path):
    """A good `spectrum`/`export` output, then a failing run into the same --out: the good one survives intact."""
    def digest(folder: Path) -> dict:
        return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((hf_folder / "model.safetensors").read_bytes()[:100])
    for cmd in ("spectrum", "export"):
        out = tmp_path / f"{cmd}_out"
        rc, err = _cli([cmd, str(hf_folder), "--out", str(out)])
        assert rc == 0, err
        before = digest(out)
        assert before
        rc, err = _cli([cmd, str(bad), "--out", str(out)])
        assert rc == 2, err
        assert digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.safetensors", "export_out", "spectrum_out"]


# ----------------------------------------------------------------------------- output containment

def test_hostile_tensor_names_stay_inside_out(tmp_path):
    """Tensor names like ../x, /abs, with NUL, newlines or CSV delimiters: outputs only inside --out."""
    names = ["../../escape.weight", "/tmp/abs.weight", "a/../../b.weight", "x\ny,z\"q.weight", "model.layers.0.mlp.up_proj.weight",
             ".hidden.weight", "=cmd|' /C calc'!A0.weight", "\u202egnp.weight"]
    rng = np.random.default_rng(0)
    from safetensors.numpy import save_file

    base = {n: rng.standard_normal((6, 4)).astype(np.float32) for n in names}
    tuned = {n: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) for n, v in base.items()}
    work = tmp_path / "work"
    work.mkdir()
    save_file(base, str(work / "base.safetensors"))
    save_file(tuned, str(work / "tuned.safetensors"))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    rc, err = _cli(["diagnose", str(work / "base.safetensors"), str(work / "tuned.safetensors"), "--out", str(work / "out")])
    assert rc == 0, err
    rc2, err2 = _cli(["spectrum", str(work / "tuned.safetensors"), "--out", str(work / "spec")])
    assert rc2 == 0, err2
    after = sorted(str(p) for p in tmp_path.rglob("*"))
    new = [p for p in after if p not in before]
    assert all(p.startswith((str(work / "out"), str(work / "spec"))) for p in new), new
    assert not Path("/tmp/abs.weight").exists() and not (tmp_path / "escape.weight").exists()
    import csv

    rows = list(csv.DictReader(open(work / "out" / "metrics.csv", newline="")))
    assert sorted(r["name"] for r in rows) == sorted(names)  # names round-trip through the CSV intact


# ----------------------------------------------------------------------------- orbax run folders

def _orbax_run(write_orbax_run, root: Path) -> Path:
    import jax

    from bshadow_jax.models import LlamaConfig, init_params

    model = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    return write_orbax_run(root, model, {1: init_params(LlamaConfig(**model), jax.random.key(0))})


def _data_files(run: Path, under: str = "") -> list[Path]:
    top = run / "checkpoints" / "1" / "params" / under
    return sorted(p for p in top.rglob("*") if p.is_file() and p.parent.name == "d")


@pytest.mark.parametrize("damage", ["delete_data", "delete_array_data", "zero_data", "garbage_metadata",
                                    "truncate_manifest"])
def test_damaged_orbax_run_folder(tmp_path, damage, write_orbax_run):
    """A damaged run folder read tensor by tensor: exit 2, one error line naming it, no output folder."""
    good = _orbax_run(write_orbax_run, tmp_path / "good")
    bad = _orbax_run(write_orbax_run, tmp_path / "bad")
    params = bad / "checkpoints" / "1" / "params"
    if damage == "delete_data":
        for p in _data_files(bad):
            p.unlink()
    elif damage == "delete_array_data":  # the tree metadata still reads; the arrays do not
        for p in _data_files(bad, "ocdbt.process_0"):
            p.unlink()
    elif damage == "zero_data":
        for p in _data_files(bad):
            p.write_bytes(b"\0" * p.stat().st_size)
    elif damage == "garbage_metadata":
        (params / "_METADATA").write_text("{not json")
    else:
        for p in params.rglob("manifest.ocdbt"):
            p.write_bytes(p.read_bytes()[:7])
    out = tmp_path / "out"
    rc, err = _cli(["diagnose", str(good), str(bad), "--out", str(out)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], err
    assert not out.exists()
