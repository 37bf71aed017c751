"""The generated base/tuned pair both diagnose benchmarks use (diagnose_speed.py on CPU, gpu_bench.py on
a device): a Llama checkpoint's tensor names and shapes, and the per-tensor delta strength."""
from __future__ import annotations


def pair_plan(dims: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF tensor names and shapes of a Llama checkpoint with an untied head, in file order (norms
    included: diagnose skips them). dims: hidden, ffn, vocab, layers, heads, kv_heads."""
    D, F, V, L = dims["hidden"], dims["ffn"], dims["vocab"], dims["layers"]
    hd = D // dims["heads"]
    q, kv = dims["heads"] * hd, dims["kv_heads"] * hd
    plan = [("model.embed_tokens.weight", (V, D))]
    for i in range(L):
        p = f"model.layers.{i}."
        plan += [
            (p + "input_layernorm.weight", (D,)),
            (p + "self_attn.q_proj.weight", (q, D)),
            (p + "self_attn.k_proj.weight", (kv, D)),
            (p + "self_attn.v_proj.weight", (kv, D)),
            (p + "self_attn.o_proj.weight", (D, q)),
            (p + "post_attention_layernorm.weight", (D,)),
            (p + "mlp.gate_proj.weight", (F, D)),
            (p + "mlp.up_proj.weight", (F, D)),
            (p + "mlp.down_proj.weight", (D, F)),
        ]
    plan += [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]
    return plan


def delta_scale(name: str, layers: int) -> float:
    """A "benchmark-shaped" footprint: the MLPs of the middle third of the layers strongest."""
    if "layers." not in name:
        return 0.002
    i = int(name.split("layers.")[1].split(".")[0])
    mid = layers // 3 <= i < max(layers // 3 + 1, 2 * layers // 3)
    return 0.05 if ("mlp." in name and mid) else 0.01
