"""The measured sections of benchmarks/gpu_bench.py: machine facts, the matmul roofline, the library's
training step, and a 7B-shaped diagnose against an independent float64 check. Kept beside the driver
(which adds the time budget, goals and report) so that each file stays readable on its own.
"""
from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time

from llama_pair import delta_scale, pair_plan  # beside this script; shared with diagnose_speed.py

DELTA_RANK, DELTA_NOISE = 16, 1e-4  # the synthetic fine-tuning delta: rank-16 signal plus dense noise


def log(msg: str) -> None:
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import jax

    dev = jax.devices()[0]
    info = {
        "platform": dev.platform,
        "device_kind": getattr(dev, "device_kind", "?"),
        "device_count": jax.device_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", ""),
    }
    stats = _mem_stats()
    if stats.get("bytes_limit"):
        info["device_memory_gb"] = stats["bytes_limit"] / 1e9
    return info


def _mem_stats() -> dict:
    import jax

    try:
        return dict(jax.devices()[0].memory_stats() or {})
    except Exception:  # CPU backends may not report
        return {}


def peak_mem_gb() -> float | None:
    peak = _mem_stats().get("peak_bytes_in_use")
    return None if peak is None else peak / 1e9


def is_oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or "Out of memory" in s


# ----------------------------------------------------------------------------------- roofline


def matmul_roofline(n: int, *, dtype_name: str = "bfloat16", rounds: int = 5, per_round: int = 10) -> dict:
    """FLOP/s of a jitted n x n x n matmul: rounds of `per_round` queued dispatches, one sync per round."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)
    ka, kb = jax.random.split(jax.random.key(0))
    # random data, never zeros: tensor cores run measurably faster on zeros
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    for _ in range(3):
        f(a, b).block_until_ready()
    secs = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(per_round):
            out = f(a, b)
        out.block_until_ready()
        secs.append((time.perf_counter() - t) / per_round)
    sec = statistics.median(secs)
    return {"n": n, "dtype": dtype_name, "seconds_median": sec, "tflops": 2 * n**3 / sec / 1e12,
            "tflops_all": [2 * n**3 / s / 1e12 for s in secs]}


# ----------------------------------------------------------------------------------- training


def _build_step(cfg, model_cfg):
    """(state, jitted donated step, batch sharding, where the step came from): the step `bshadow train` runs."""
    import jax

    from bshadow_jax.training import mesh as mesh_lib
    from bshadow_jax.training.compiled import compile_train_step

    tc = cfg.train
    mesh = mesh_lib.make_mesh(cfg.mesh, batch_size=tc.batch_size, grad_accum=tc.grad_accum)
    compiled = compile_train_step(model_cfg, cfg.optim, steps=tc.steps, mesh=mesh, compute_dtype=tc.compute_dtype,
                                  grad_accum=tc.grad_accum, remat=tc.remat)
    state = compiled.init_random(jax.random.key(cfg.seed), cfg.seed)
    return state, compiled.step_fn, mesh_lib.batch_sharding(mesh), "bshadow_jax.training.compiled.compile_train_step"


def random_batch(key, batch: int, seq_len: int, vocab: int, sharding=None) -> dict:
    """The pipeline's batch dict with uniform random tokens: one segment per row, every token in the loss."""
    import jax
    import jax.numpy as jnp

    toks = jax.random.randint(key, (batch, seq_len + 1), 0, vocab, dtype=jnp.int32)
    b = {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "segment_ids": jnp.ones((batch, seq_len), jnp.int32),
        "positions": jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
        "loss_mask": jnp.ones((batch, seq_len), jnp.float32),
    }
    return jax.device_put(b, sharding) if sharding is not None else b


def _param_count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _train_once(model_dict: dict, *, batch: int, seq_len: int, steps: int, warmup: int, compute_dtype: str,
                remat: str = "none") -> dict:
    import jax

    from bshadow_jax.training.config import train_config_from_dict

    cfg = train_config_from_dict({
        "seed": 0,
        "model": model_dict,
        "train": {"steps": 1000, "batch_size": batch, "seq_len": seq_len, "compute_dtype": compute_dtype,
                  "remat": remat},
        "optim": {"name": "adamw", "warmup_steps": 10},
    })
    model_cfg = cfg.llama_config()
    t = time.perf_counter()
    state, step, bsh, source = _build_step(cfg, model_cfg)
    n_params = _param_count(state.params)
    batches = [random_batch(jax.random.key(100 + i), batch, seq_len, model_cfg.vocab_size, bsh) for i in range(2)]
    jax.block_until_ready((state, batches))
    build_s = time.perf_counter() - t

    t = time.perf_counter()
    state, m = step(state, batches[0])
    jax.block_until_ready((state, m))
    first_s = time.perf_counter() - t
    loss_first = float(m["loss"])
    for i in range(warmup):
        state, m = step(state, batches[(i + 1) % 2])
    jax.block_until_ready((state, m))
    times = []
    for i in range(steps):
        t = time.perf_counter()
        state, m = step(state, batches[i % 2])
        jax.block_until_ready((state, m))
        times.append(time.perf_counter() - t)
    # the same steps queued back to back with one sync, as a training loop runs them between log steps
    t = time.perf_counter()
    for i in range(steps):
        state, m = step(state, batches[i % 2])
    jax.block_until_ready((state, m))
    pipelined = (time.perf_counter() - t) / steps
    loss_last = float(m["loss"])
    del state, batches, m
    from bshadow_jax.models import flops_per_token

    fpt, n_matmul = flops_per_token(model_cfg, seq_len)
    return {
        "step_source": source, "batch": batch, "seq_len": seq_len, "compute_dtype": compute_dtype, "remat": remat,
        "params_total": n_params, "params_matmul": n_matmul, "flops_per_token": fpt,
        "build_s": build_s, "first_step_s": first_s, "step_s_median": statistics.median(times), "step_s_all": times,
        "step_s_pipelined": pipelined,
        "loss_first": loss_first, "loss_last": loss_last, "peak_mem_gb_so_far": peak_mem_gb(),
        "model": {k: v for k, v in model_dict.items()},
    }


def bench_train(model_dict: dict, *, batch: int, seq_len: int, steps: int, warmup: int, compute_dtype: str,
                roofline_tflops: float | None, peak_tflops: float, remat: str = "none") -> dict:
    import jax

    oom = []
    while True:
        try:
            res = _train_once(model_dict, batch=batch, seq_len=seq_len, steps=steps, warmup=warmup,
                              compute_dtype=compute_dtype, remat=remat)
            break
        except Exception as e:
            if not is_oom(e) or batch <= 1:
                raise
            log(f"batch {batch}: out of device memory; retrying with {batch // 2}")
            oom.append(batch)
            batch //= 2
            gc.collect()
            jax.clear_caches()
    tokens = res["batch"] * res["seq_len"]
    tps = tokens / res["step_s_median"]
    achieved = tps * res["flops_per_token"] / 1e12
    res.update({
        "tokens_per_s_pipelined": tokens / res["step_s_pipelined"],
        "oom_batches": oom,
        "tokens_per_step": tokens,
        "tokens_per_s": tps,
        "achieved_tflops": achieved,
        "peak_tflops_spec": peak_tflops,
        "mfu_spec": achieved / peak_tflops,
        "roofline_tflops": roofline_tflops,
        "mfu_roofline": (achieved / roofline_tflops) if roofline_tflops else None,
        "loss_finite": math.isfinite(res["loss_first"]) and math.isfinite(res["loss_last"]),
    })
    return res


# ----------------------------------------------------------------------------------- diagnose


def _gen_fns(dtype_name: str):
    import functools

    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(dtype_name)

    @functools.partial(jax.jit, static_argnums=2)
    def matrix_pair(key, scale, shape):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        m, n = shape
        base = 0.02 * jax.random.normal(k1, shape, jnp.float32)
        a = jax.random.normal(k2, (m, DELTA_RANK), jnp.float32)
        b = jax.random.normal(k3, (DELTA_RANK, n), jnp.float32)
        low = jnp.matmul(a, b, precision="highest") * (scale / math.sqrt(DELTA_RANK * n))
        tuned = base + low + DELTA_NOISE * jax.random.normal(k4, shape, jnp.float32)
        return base.astype(dtype), tuned.astype(dtype)

    def vector_pair(seed, shape):
        # norms are never diagnosed (1-D): made on the host, one compile fewer
        import numpy as np

        rng = np.random.default_rng(seed)
        base = np.ones(shape, np.float32)
        tuned = base + np.float32(1e-3) * rng.standard_normal(shape, dtype=np.float32)
        return jax.device_put(base.astype(dtype)), jax.device_put(tuned.astype(dtype))

    return matrix_pair, vector_pair


def make_pair_on_device(dims: dict, dtype_name: str, seed: int = 0) -> tuple[dict, dict]:
    """Flat name -> device array dicts (base, tuned), generated tensor by tensor on the default device."""
    import jax

    matrix_pair, vector_pair = _gen_fns(dtype_name)
    key = jax.random.key(seed)
    base, tuned = {}, {}
    for i, (name, shape) in enumerate(pair_plan(dims)):
        k = jax.random.fold_in(key, i)
        if len(shape) == 1:
            base[name], tuned[name] = vector_pair([seed, i], shape)
        else:
            base[name], tuned[name] = matrix_pair(k, delta_scale(name, dims["layers"]), shape)
    jax.block_until_ready((base, tuned))
    return base, tuned


def _check_rows(rows: list[dict], base: dict, tuned: dict, names: list[str]) -> dict:
    """Max relative error of a few delta metrics against scipy svdvals of the host float32 delta."""
    import numpy as np
    import scipy.linalg

    by_name = {r["name"]: r for r in rows}
    errs: dict[str, float] = {}
    checked = []
    for n in names:
        if n not in by_name:
            continue
        d = np.asarray(tuned[n], np.float32) - np.asarray(base[n], np.float32)
        sv = scipy.linalg.svdvals(d, check_finite=False).astype(np.float64)
        s2 = float(np.sum(sv**2))
        p = sv / sv.sum()
        p = p[p > 0]
        ref = {
            "delta_spectral_norm": float(sv[0]),
            "delta_fro": math.sqrt(s2),
            "delta_nuclear_norm": float(sv.sum()),
            "delta_effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        }
        for k, v in ref.items():
            got = by_name[n].get(k)
            if got is None:
                continue
            errs[k] = max(errs.get(k, 0.0), abs(float(got) - v) / max(abs(v), 1e-30))
        checked.append(n)
    return {"matrices": checked, "max_rel_err": errs, "reference": "scipy.linalg.svdvals(float32 delta, host)"}


def bench_diagnose(dims: dict, *, dtype_name: str, budget_mb: float, precision: str, check: int) -> dict:
    import jax

    from bshadow_jax.diagnostics import diagnose

    t = time.perf_counter()
    base, tuned = make_pair_on_device(dims, dtype_name)
    gen_s = time.perf_counter() - t
    n_bytes = sum(x.size * x.dtype.itemsize for x in base.values())
    n_mat = sum(1 for x in base.values() if x.ndim == 2)
    log(f"pair made on {jax.devices()[0].platform}: {n_mat} matrices, {n_bytes / 1e9:.2f} GB a side "
        f"({dtype_name}) in {gen_s:.1f} s")

    kw = {"budget_mb": budget_mb, "progress": False}
    t = time.perf_counter()
    if precision == "default":
        res = diagnose(base, tuned, **kw)
    else:
        with jax.default_matmul_precision(precision):
            res = diagnose(base, tuned, **kw)
    diag_s = time.perf_counter() - t
    rows = res.rows
    finite = all(
        all(v is None or not isinstance(v, float) or math.isfinite(v) for v in r.values()) for r in rows
    )
    L = dims["layers"]
    mid = L // 2
    want = ["model.layers.0.self_attn.q_proj.weight", f"model.layers.{mid}.mlp.down_proj.weight",
            f"model.layers.{L - 1}.self_attn.o_proj.weight"][:max(0, check)]
    t = time.perf_counter()
    chk = _check_rows(rows, base, tuned, want) if want else {}
    chk["seconds"] = time.perf_counter() - t
    out = {
        "dims": dims, "storage_dtype": dtype_name, "budget_mb": budget_mb, "matmul_precision": precision,
        "matrices": len(rows), "skipped": len(res.summary.get("skipped", [])),
        "vectors": len(getattr(res, "vectors", [])),
        "bytes_per_side": n_bytes, "params_per_side": int(sum(x.size for x in base.values())),
        "generate_s": gen_s, "diagnose_s": diag_s,
        "matrices_per_s": len(rows) / diag_s if diag_s > 0 else None,
        "recomputed_exact": res.summary.get("recomputed_exact"),
        "metrics_finite": finite,
        "footprint": {k: v for k, v in (res.summary.get("footprint") or {}).items() if isinstance(v, (int, float))},
        "check": chk, "peak_mem_gb_so_far": peak_mem_gb(),
    }
    del base, tuned, res
    return out


# ----------------------------------------------------------------------------------- eval


def bench_eval(model_dict: dict, *, rows: int, seq_len: int, steps: int, compute_dtype: str) -> dict:
    """Scoring throughput: the jitted log-prob function of evals.scoring (what the studies' narrow/broad
    evaluation runs; `bshadow eval`'s adapter batches the same forward pass) on packed rows of random
    tokens, random weights. Tokens scored per second, median over `steps` timed calls after a compiling one.
    """
    import jax
    import numpy as np

    from bshadow_jax.evals.scoring import K_GATHER, model_logprob_fn
    from bshadow_jax.models import init_params
    from bshadow_jax.training.config import train_config_from_dict

    model_cfg = train_config_from_dict({"seed": 0, "model": model_dict,
                                        "train": {"steps": 1, "batch_size": 1, "seq_len": seq_len}}).llama_config()
    t = time.perf_counter()
    params = init_params(model_cfg, jax.random.key(0))
    fn = model_logprob_fn(model_cfg, params, compute_dtype=compute_dtype)
    rng = np.random.default_rng(0)
    inputs = rng.integers(0, model_cfg.vocab_size, (rows, seq_len), dtype=np.int32)
    seg = np.ones((rows, seq_len), np.int32)
    pos = np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len)).copy()
    gather = rng.integers(0, model_cfg.vocab_size, (rows, seq_len, K_GATHER), dtype=np.int32)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    lp, _ = fn(inputs, seg, pos, gather)  # numpy out: includes the device-to-host copy, as scoring pays it
    first_s = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        lp, _ = fn(inputs, seg, pos, gather)
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"rows": rows, "seq_len": seq_len, "compute_dtype": compute_dtype, "params_total": _param_count(params),
            "build_s": build_s, "first_call_s": first_s, "call_s_median": med, "call_s_all": times,
            "tokens_per_s": rows * seq_len / med, "logp_finite": bool(np.isfinite(lp).all()),
            "model": dict(model_dict)}
