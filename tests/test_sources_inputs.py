"""open_checkpoint on small files: kinds, ordering, dtypes, and every bad input as a UserError."""
from __future__ import annotations

import importlib
import json
import struct

import numpy as np

from bshadow_jax.models import checkpoint_config
import pytest

from bshadow_jax.errors import UserError
from bshadow_jax.formats.sources import open_checkpoint, sort_layer_order

torch = importlib.import_module("torch")
from safetensors.numpy import save_file  # noqa: E402
from safetensors.torch import save_file as save_torch  # noqa: E402


def _st_header_file(path, header: dict, data: bytes = b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_single_file_kinds_dtypes_and_upcast(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=g, dtype=torch.float32).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(4, 6, generator=g).to(torch.float16),
        "model.embed_tokens.weight": torch.randn(10, 4, generator=g),
        "model.norm.weight": torch.randn(4, generator=g, dtype=torch.float64),
    }
    path = tmp_path / "w.safetensors"
    save_torch(tensors, str(path))
    with open_checkpoint(path) as src:
        assert src.kind == "safetensors" and src.path == str(path) and checkpoint_config(src, required=False) is None
        assert src.names()[0] == "model.embed_tokens.weight" and src.names()[-1] == "model.norm.weight"
        assert src.dtype("model.layers.0.mlp.up_proj.weight") == "BF16"
        for name, t in tensors.items():
            got = src.read(name)
            assert got.dtype == np.float32 and src.shape(name) == tuple(t.shape)
            np.testing.assert_array_equal(got, t.to(torch.float32).numpy())
        with pytest.raises(UserError, match="no tensor named nope"):
            src.read("nope")


def test_layer_order_is_numeric():
    names = ["lm_head.weight", "model.norm.weight", "model.layers.10.mlp.up_proj.weight",
             "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight",
             "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight"]
    assert sort_layer_order(names) == [
        "model.embed_tokens.weight", "model.layers.1.input_layernorm.weight",
        "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight",
        "model.layers.10.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]


def test_sharded_folder_with_config(tmp_path):
    rng = np.random.default_rng(0)
    a = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((3, 2), dtype=np.float32) for i in range(12)}
    names = sorted(a)
    save_file({n: a[n] for n in names[:6]}, str(tmp_path / "a.safetensors"))
    save_file({n: a[n] for n in names[6:]}, str(tmp_path / "b.safetensors"))
    wm = {n: ("a" if i < 6 else "b") + ".safetensors" for i, n in enumerate(names)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 2, "intermediate_size": 3, "num_hidden_layers": 12,
        "num_attention_heads": 1, "num_key_value_heads": 1, "rms_norm_eps": 1e-6, "rope_theta": 500.0}))
    with open_checkpoint(tmp_path) as src:
        assert src.kind == "hf"
        assert [int(n.split(".")[2]) for n in src.names()] == list(range(12))
        for n in names:
            np.testing.assert_array_equal(src.read(n), a[n])
        cfg = checkpoint_config(src)
        assert cfg.num_hidden_layers == 12 and cfg.rope_theta == 500.0


def test_other_architectures_have_no_config(tmp_path):
    save_file({"encoder.w": np.ones((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with open_checkpoint(tmp_path) as src:
        assert src.names() == ["encoder.w"] and checkpoint_config(src, required=False) is None


def _bad_inputs(tmp_path):
    """name -> path; every one must give a UserError naming `name`."""
    out = {}

    def put(name, data: bytes):
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        out[name] = p

    put("x.gguf", b"just some text, not a model\n")
    put("empty.gguf", b"")
    put("empty.safetensors", b"")
    put("short.safetensors", b"\x01\x02")
    put("garbage.safetensors", struct.pack("<Q", 12) + b"{not json!!}")
    put("hugeheader.safetensors", struct.pack("<Q", 1 << 40) + b"{}")
    _st_header_file(tmp_path / "huge_tensor.safetensors",
                    {"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40_000_000_000]}}, b"\0" * 16)
    out["huge_tensor.safetensors"] = tmp_path / "huge_tensor.safetensors"
    _st_header_file(tmp_path / "mismatch.safetensors",
                    {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 8]}}, b"\0" * 8)
    out["mismatch.safetensors"] = tmp_path / "mismatch.safetensors"
    _st_header_file(tmp_path / "baddtype.safetensors",
                    {"w": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 1]}}, b"\0")
    out["baddtype.safetensors"] = tmp_path / "baddtype.safetensors"
    put("model.bin", b"\x80\x04pickle")
    put("weights.pt", b"\x80\x04pickle")
    put("notes.txt", b"hello")
    # truncated real safetensors file
    full = tmp_path / "full.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(full))
    put("truncated.safetensors", full.read_bytes()[:-100])
    full.unlink()
    # sharded folder whose index names a missing shard
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(shard_dir / "model-00001-of-00002.safetensors"))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    out["model-00002-of-00002.safetensors"] = shard_dir
    # index naming a tensor its shard does not hold
    wrong = tmp_path / "wrongshard"
    wrong.mkdir()
    save_file({"a": np.ones(2, np.float32)}, str(wrong / "s1.safetensors"))
    (wrong / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                                   "ghost": "s1.safetensors"}}))
    out["ghost"] = wrong
    # index escaping its folder
    esc = tmp_path / "escape"
    esc.mkdir()
    (esc / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "../../etc/passwd"}}))
    out["../../etc/passwd"] = esc
    bad_index = tmp_path / "badindex"
    bad_index.mkdir()
    (bad_index / "model.safetensors.index.json").write_text("[1, 2")
    out["model.safetensors.index.json"] = bad_index
    # HF folder with only pickle weights
    pk = tmp_path / "pickled"
    pk.mkdir()
    (pk / "config.json").write_text("{}")
    (pk / "pytorch_model.bin").write_bytes(b"\x80\x04")
    out["pytorch_model.bin"] = pk
    out["does_not_exist"] = tmp_path / "does_not_exist"
    return out


def test_bad_inputs_are_one_line_user_errors(tmp_path):
    for name, path in _bad_inputs(tmp_path).items():
        with pytest.raises(UserError) as info:
            with open_checkpoint(path) as src:
                for n in src.names():
                    src.read(n)
        msg = str(info.value)
        assert name in msg and "\n" not in msg, (name, msg)


def test_load_pretrained_refuses_the_same_inputs(tmp_path):
    from bshadow_jax.models import load_pretrained

    bad = _bad_inputs(tmp_path)
    for name in ("x.gguf", "empty.gguf", "garbage.safetensors", "model.bin"):
        path = bad[name]
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            load_pretrained(path)


def test_cli_exit_code_two(tmp_path, capsys):
    from bshadow_jax.cli import main

    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    rc = main(["export", str(bad), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error:") and "x.gguf" in err and "Traceback" not in err


def test_run_folder_and_step_folder(tmp_path, monkeypatch, write_orbax_run):
    """A run folder (latest step) and an orbax step folder, written with orbax directly, read per tensor."""
    import jax

    from bshadow_jax.models import LlamaConfig, flatten_params, init_params

    model = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1)
    cfg = LlamaConfig(**model)
    trees = {step: init_params(cfg, jax.random.key(step)) for step in (3, 7)}
    write_orbax_run(tmp_path, model, trees)

    def whole_load(*a, **k):
        raise AssertionError("the source must not restore the whole params item")

    monkeypatch.setattr("bshadow_jax.formats.orbax.load_params_numpy", whole_load)
    for path, step in ((tmp_path, 7), (tmp_path / "checkpoints" / "3", 3)):
        flat = flatten_params(trees[step])
        with open_checkpoint(path) as src:
            assert src.kind == "orbax" and checkpoint_config(src) == cfg
            assert sorted(src.names()) == sorted(flat) and src.names()[0] == "model.embed_tokens.weight"
            for name in src.names():
                assert src.shape(name) == flat[name].shape and src.dtype(name) == "F32"
                np.testing.assert_array_equal(src.read(name), np.asarray(flat[name]))
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(UserError, match="not_a_run"):
        open_checkpoint(empty)


def test_a_run_folder_is_read_without_its_training_recipe(tmp_path, write_orbax_run, capsys):
    """Reading weights needs only the model section: a data or optimizer section that today's
    validation would refuse (a rule added after the run was made) does not lock the run out."""
    import jax
    import yaml

    from bshadow_jax.cli import main
    from bshadow_jax.models import LlamaConfig, init_params, load_pretrained

    model = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    cfg = LlamaConfig(**model)
    runs = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        runs[name] = write_orbax_run(tmp_path / name, model, {5: init_params(cfg, jax.random.key(seed))})
        (runs[name] / "config.yaml").write_text(yaml.safe_dump(
            {"model": model, "data": {"arm": "a_future_arm", "sources": {"no_such_stream": 1.0}},
             "optim": {"name": "not_an_optimizer"}}))
    loaded_cfg, params = load_pretrained(runs["tuned"])
    assert loaded_cfg == cfg and params["model"]["embed_tokens"]["weight"].shape == (32, 16)
    out = tmp_path / "diag"
    assert main(["diagnose", str(runs["base"]), str(runs["tuned"]), "--out", str(out)]) == 0, capsys.readouterr().err
    assert (out / "metrics.csv").is_file()


def test_hub_ids_resolve_to_a_snapshot_of_safetensors_and_json_only(tmp_path, monkeypatch, capsys):
    """`org/name` goes through huggingface_hub.snapshot_download (here answered from a local folder in the
    same format) for every command; the snapshot asks for no pickle weights and no code."""
    import huggingface_hub
    import jax

    from bshadow_jax.cli import main
    from bshadow_jax.models import LlamaConfig, init_params, load_pretrained, save_pretrained

    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    folders = {}
    for name, seed in (("org/base", 0), ("org/tuned", 1)):
        folders[name] = save_pretrained(cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.key(seed))),
                                        tmp_path / name.replace("/", "_"))
    asked = []

    def snapshot_download(repo_id, allow_patterns=None, **kw):
        asked.append((repo_id, tuple(allow_patterns or ())))
        return str(folders[repo_id])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)  # "org/base" must not exist as a local path
    with open_checkpoint("org/base") as src:
        assert src.kind == "hf" and "model.embed_tokens.weight" in src.names()
    assert load_pretrained("org/tuned")[0] == cfg
    assert main(["diagnose", "org/base", "org/tuned", "--out", str(tmp_path / "diag")]) == 0, capsys.readouterr().err
    assert {r for r, _ in asked} == {"org/base", "org/tuned"}
    patterns = {p for _, ps in asked for p in ps}
    assert not any(p.endswith((".bin", ".pt", ".py", "*")) and p != "tokenizer*" for p in patterns), patterns
