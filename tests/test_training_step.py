"""Pure train/eval steps: masked loss against a numpy reference, grad accumulation, optimizer recipe."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from testkit import tiny_model_config

from bshadow_jax.data.synthetic import synthetic_batch
from bshadow_jax.models.llama import LlamaConfig, forward, init_params
from bshadow_jax.training.compiled import compile_train_step
from bshadow_jax.training.config import MeshSection, OptimSection
from bshadow_jax.training.mesh import make_mesh
from bshadow_jax.training.optim import decay_mask, make_optimizer, make_schedule
from bshadow_jax.training.state import init_state
from bshadow_jax.training.step import eval_step, loss_sums, make_train_step

CFG = LlamaConfig(**tiny_model_config(vocab_size=61))
B, T = 8, 16


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def batch():
    return synthetic_batch(3, vocab_size=CFG.vocab_size, seq_len=T, batch_size=B, seed=1)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_masked_loss_matches_numpy_reference(params, batch):
    logits = np.asarray(forward(CFG, params, batch["inputs"], batch["segment_ids"], batch["positions"]), np.float64)
    nll = -np.take_along_axis(_np_log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    mask = batch["loss_mask"]
    assert 0 < mask.sum() < mask.size  # the mask really drops positions
    want = (nll * mask).sum() / mask.sum()
    loss_sum, count = jax.jit(lambda p, b: loss_sums(p, b, model_cfg=CFG))(params, batch)
    assert count == mask.sum()
    np.testing.assert_allclose(float(loss_sum / count), want, rtol=1e-5)
    ev = eval_step(params, batch, model_cfg=CFG)
    np.testing.assert_allclose(float(ev["loss_sum"]), float(loss_sum), rtol=1e-6)


def test_answer_only_mask_ignores_masked_targets(params, batch):
    """Changing targets where loss_mask is 0 (prompt/padding) changes neither loss nor gradients."""
    other = dict(batch)
    rng = np.random.default_rng(0)
    other["targets"] = np.where(batch["loss_mask"] > 0, batch["targets"],
                                rng.integers(0, CFG.vocab_size, size=batch["targets"].shape)).astype(np.int32)
    assert (other["targets"] != batch["targets"]).any()
    g = jax.jit(jax.grad(lambda p, b: loss_sums(p, b, model_cfg=CFG)[0]))
    ga, gb = g(params, batch), g(params, other)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # ...while unmasking them does change the loss
    full = dict(other, loss_mask=np.ones_like(batch["loss_mask"]))
    assert abs(float(loss_sums(params, full, model_cfg=CFG)[0]) - float(loss_sums(params, other, model_cfg=CFG)[0])) > 1e-3


# plain SGD: the new params are linear in the gradient (Adam's first step is ~sign(g))
SGD = OptimSection(name="sgd", lr=1.0, warmup_steps=0, clip_norm=0)


@pytest.fixture(scope="module")
def uneven_batch(batch):
    # uneven loss_mask per row, so a naive mean of micro-batch means would differ
    return dict(batch, loss_mask=batch["loss_mask"] * (np.arange(B)[:, None] % 3 > 0))


@pytest.fixture(scope="module")
def full_step(params, uneven_batch):
    tx, schedule = make_optimizer(SGD, 10)
    return jax.jit(make_train_step(CFG, tx, schedule))(init_state(params, tx, 0), uneven_batch)


def test_grad_accumulation_equals_full_batch(params, uneven_batch, full_step):
    tx, schedule = make_optimizer(SGD, 10)
    accum = jax.jit(make_train_step(CFG, tx, schedule, grad_accum=2))(init_state(params, tx, 0), uneven_batch)
    for k in ("loss", "grad_norm", "tokens", "lr"):
        np.testing.assert_allclose(float(accum[1][k]), float(full_step[1][k]), rtol=2e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(full_step[0].params), jax.tree.leaves(accum[0].params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    assert int(full_step[0].step) == int(accum[0].step) == 1


def test_compiled_step_is_the_pure_step_sharded_and_cached(params, uneven_batch, full_step):
    """compile_train_step (what `bshadow train`, the studies and the benchmarks run) computes the pure step."""
    mesh = make_mesh(MeshSection(), batch_size=B)
    prog = compile_train_step(CFG, SGD, steps=10, mesh=mesh)
    assert compile_train_step(CFG, SGD, steps=10, mesh=mesh) is prog  # one compile per settings
    state = prog.init_from_params(params, 0)
    assert jax.tree.structure(state) == jax.tree.structure(prog.abstract)
    state, metrics = prog.step_fn(state, uneven_batch)
    for k in ("loss", "grad_norm", "tokens", "lr"):
        np.testing.assert_allclose(float(metrics[k]), float(full_step[1][k]), rtol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(full_step[0].params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)
    for leaf, sharding in zip(jax.tree.leaves(state.params), jax.tree.leaves(prog.shardings.params)):
        assert leaf.sharding == sharding


def test_bf16_compute_keeps_float32_master_weights(params, uneven_batch, full_step):
    tx, schedule = make_optimizer(SGD, 10)
    bf16 = jax.jit(make_train_step(CFG, tx, schedule, compute_dtype="bfloat16"))(init_state(params, tx, 0), uneven_batch)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16[0].params))
    np.testing.assert_allclose(float(bf16[1]["loss"]), float(full_step[1]["loss"]), rtol=2e-2)
    np.testing.assert_allclose(float(bf16[1]["grad_norm"]), float(full_step[1]["grad_norm"]), rtol=5e-2)


def test_weight_decay_mask_excludes_norms_biases_embeddings():
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, attention_bias=True, model_type="qwen2")
    p = init_params(cfg, jax.random.key(1))
    mask = decay_mask(p)
    layer = mask["model"]["layers"]["0"]
    assert layer["self_attn"]["q_proj"]["weight"] and layer["mlp"]["down_proj"]["weight"]
    assert not layer["self_attn"]["q_proj"]["bias"] and not layer["input_layernorm"]["weight"]
    assert not mask["model"]["embed_tokens"]["weight"] and mask["lm_head"]["weight"]
    assert decay_mask(p, decay_embeddings=True)["model"]["embed_tokens"]["weight"]
    # one AdamW step on zero gradients only decays the masked-in leaves: -lr * wd * w
    tx, _ = make_optimizer(OptimSection(lr=0.1, warmup_steps=0, weight_decay=0.5, schedule="constant"), 5)
    zeros = jax.tree.map(jnp.zeros_like, p)
    upd, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zeros, p)
    assert float(jnp.abs(upd["model"]["layers"]["0"]["input_layernorm"]["weight"]).max()) == 0.0
    assert float(jnp.abs(upd["model"]["embed_tokens"]["weight"]).max()) == 0.0
    np.testing.assert_allclose(np.asarray(upd["lm_head"]["weight"]), -0.1 * 0.5 * np.asarray(p["lm_head"]["weight"]),
                               rtol=1e-6)


@pytest.mark.parametrize("name", ["adamw", "lion", "sgd", "sgd_momentum", "adafactor"])
def test_every_optimizer_minimises(name):
    """Each configurable optimizer (clip + schedule + masked decay) descends a least-squares problem."""
    rng = np.random.default_rng(0)
    A, y = jnp.asarray(rng.normal(size=(32, 16)), jnp.float32), jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)
    p = {"w": {"weight": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}, "norm": {"weight": jnp.ones((8,))}}
    loss = lambda p: jnp.mean((A @ p["w"]["weight"] * p["norm"]["weight"] - y) ** 2)  # noqa: E731
    lr = {"sgd": 0.3, "sgd_momentum": 0.1}.get(name, 3e-2)
    tx, _ = make_optimizer(OptimSection(name=name, lr=lr, warmup_steps=2, weight_decay=0.01), 50)

    @jax.jit
    def run(p):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None
        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), None, length=50)
        return loss(p)

    assert float(run(p)) < 0.8 * float(loss(p))


def test_schedule_warmup_then_cosine_to_min_ratio():
    cfg = OptimSection(lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    s = make_schedule(cfg, 20)
    vals = np.array([float(s(i)) for i in range(21)])
    assert vals[0] > 0 and np.all(np.diff(vals[:5]) > 0) and abs(vals[4] - 1.0) < 1e-6
    assert np.all(np.diff(vals[4:]) <= 1e-7) and abs(vals[20] - 0.1) < 1e-6
    ref = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * (10 - 4) / 16))
    np.testing.assert_allclose(vals[10], ref, rtol=1e-5)
    assert float(make_schedule(OptimSection(lr=0.5, warmup_steps=0, schedule="constant"), 10)(7)) == 0.5



def test_remat_policies_same_gradients_less_activation_memory(params):
    """train.remat changes what the backward keeps, not what it computes; XLA's own buffer plan shows the saving."""
    from bshadow_jax.training.step import grads_and_sums, remat_compiler_options

    long_batch = synthetic_batch(4, vocab_size=CFG.vocab_size, seq_len=64, batch_size=B, seed=2)

    def grad_fn(remat):
        return jax.jit(lambda p, b: grads_and_sums(p, b, model_cfg=CFG, remat=remat))

    ref_grads, ref_loss, _ = grad_fn("none")(params, long_batch)
    temp = {}
    for remat in ("none", "dots", "full"):
        grads, loss, _ = grad_fn(remat)(params, long_batch)
        assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            # recomputed ops fuse differently: float32 rounding, relative to the leaf's scale
            b = np.asarray(b)
            np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-6 * np.abs(b).max())
        # the options the train loop compiles with (XLA:CPU's memory-aware scheduler when remat is on)
        options = remat_compiler_options(remat, "cpu")
        compiled = grad_fn(remat).lower(params, long_batch).compile(compiler_options=options)
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    # XLA's own buffer plan: the saving is real, not just fewer residuals in the jaxpr
    assert temp["full"] < 0.8 * temp["none"] and temp["dots"] < 0.85 * temp["none"], temp
    with pytest.raises(ValueError, match="remat"):
        forward(CFG, params, long_batch["inputs"], remat="layers")


def test_remat_config_values():
    from bshadow_jax.errors import ConfigError
    from bshadow_jax.training.config import train_config_from_dict

    model = tiny_model_config(vocab_size=61, num_hidden_layers=1, without=("max_position_embeddings",))
    assert train_config_from_dict({"model": model, "train": {"remat": "dots"}}).train.remat == "dots"
    assert train_config_from_dict({"model": model}).train.remat == "none"
    with pytest.raises(ConfigError, match="remat"):
        train_config_from_dict({"model": model, "train": {"remat": "everything"}})


def test_train_loop_with_remat_matches_without(tmp_path):
    """The loop compiles remat steps with their own options; the run's losses and weights stay the same."""
    from bshadow_jax.training.config import train_config_from_dict
    from bshadow_jax.training.loop import train
    from bshadow_jax.data.synthetic import make_synthetic_dataset

    model = tiny_model_config(vocab_size=61)
    results = {}
    for remat in ("none", "full"):
        cfg = train_config_from_dict({
            "seed": 1, "model": model, "optim": {"lr": 1e-2, "warmup_steps": 1},
            "train": {"steps": 3, "batch_size": 8, "seq_len": 32, "log_every": 1, "checkpoint_every": 3,
                      "remat": remat},
        })
        ds = lambda b: make_synthetic_dataset(vocab_size=61, seq_len=32, batch_size=b, seed=4)  # noqa: E731
        results[remat] = train(cfg, tmp_path / remat, dataset=ds)
    np.testing.assert_allclose([m["loss"] for m in results["full"].metrics],
                               [m["loss"] for m in results["none"].metrics], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results["full"].params), jax.tree.leaves(results["none"].params)):
        # Adam moves each weight by about lr * sign(g): float rounding of a tiny gradient shows at lr scale
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
