"""Plain-loop float64 references for the MoE and MoA layers (independent of the layer code).

They read the layer's parameters and recompute every token one at a time, following
docs/methods.md and docs/layers.md literally: logits, softmax, top-k (or each expert's
top-C), capacity by priority order, gate * expert MLP.
"""

from __future__ import annotations

import math

import numpy as np


def gelu(x):
    # jax.nn.gelu's default (tanh approximation).
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def params(layer) -> dict[str, np.ndarray]:
    out = {
        "w_in": np.asarray(layer.experts.w_in[...], np.float64),
        "w_out": np.asarray(layer.experts.w_out[...], np.float64),
    }
    router = layer.router
    if hasattr(router, "kernel"):
        out["kernel"] = np.asarray(router.kernel[...], np.float64)
    if hasattr(router, "task_logits"):
        out["task_logits"] = np.asarray(router.task_logits[...], np.float64)
    return out


def token_logits(p, routing: str, x_n, task):
    """One token's E logits."""
    logits = 0.0
    if routing in ("tokens", "experts", "task_tokens"):
        logits = logits + x_n @ p["kernel"]
    if routing == "per_task":
        logits = logits + x_n @ p["kernel"][task]
    if routing in ("task", "task_tokens"):
        logits = logits + p["task_logits"][task]
    return np.broadcast_to(logits, (p["w_in"].shape[0],)).astype(np.float64)


def softmax(z):
    z = z - z.max()
    return np.exp(z) / np.exp(z).sum()


def expert_mlp(p, e, x_n):
    return gelu(x_n @ p["w_in"][e]) @ p["w_out"][e]


def moe_loop(
    layer,
    x,
    task_ids=None,
    *,
    capacity=None,
    group_size=None,
    batch_priority=False,
    renormalize=False,
):
    """Reference MoE output [B, L, D] (float64) and kept [N, E] for token or expert choice.

    capacity=None: dropless. Token-choice priority: k-major, then token order (or top gate
    descending with batch_priority), per group of `group_size` tokens.
    """
    p = params(layer)
    x = np.asarray(x, np.float64)
    batch, length, d = x.shape
    tokens = x.reshape(-1, d)
    n_tokens = tokens.shape[0]
    tasks = np.zeros(n_tokens, int) if task_ids is None else np.repeat(np.asarray(task_ids), length)
    num_experts, top_k = p["w_in"].shape[0], layer.top_k
    probs = np.stack(
        [softmax(token_logits(p, layer.routing, tokens[n], tasks[n])) for n in range(n_tokens)]
    )
    group_size = group_size or n_tokens
    y = np.zeros_like(tokens)
    kept = np.zeros((n_tokens, num_experts))
    for start in range(0, n_tokens, group_size):
        group = list(range(start, start + group_size))
        if layer.routing == "experts":
            cap = capacity or group_size
            for e in range(num_experts):
                chosen = sorted(group, key=lambda n: -probs[n, e])[:cap]
                for n in chosen:
                    y[n] += probs[n, e] * expert_mlp(p, e, tokens[n])
                    kept[n, e] = 1
            continue
        choices = {}
        for n in group:
            order = np.argsort(-probs[n], kind="stable")[:top_k]
            gates = probs[n, order]
            if renormalize:
                gates = gates / gates.sum()
            choices[n] = list(zip(order, gates, strict=True))
        priority = sorted(group, key=lambda n: -choices[n][0][1]) if batch_priority else group
        load = np.zeros(num_experts, int)
        for k in range(top_k):
            for n in priority:
                e, gate = choices[n][k]
                if capacity is not None and load[e] >= capacity:
                    continue
                load[e] += 1
                kept[n, e] = 1
                y[n] += gate * expert_mlp(p, e, tokens[n])
    return y.reshape(batch, length, d), kept


def moa_loop(layer, x, task_ids=None, mask=None, causal=False):
    """Reference MoA output [B, L, D]: per token, per chosen expert, one attention head.

    Padding tokens are keys for no one and are not routed, so their output is zero.
    """
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    router = {"w_in": np.zeros((layer.num_experts, 1, 1))}
    if hasattr(layer.router, "kernel"):
        router["kernel"] = np.asarray(layer.router.kernel[...], np.float64)
    if hasattr(layer.router, "task_logits"):
        router["task_logits"] = np.asarray(layer.router.task_logits[...], np.float64)
    w_query = np.asarray(layer.w_query[...], np.float64)
    w_out = np.asarray(layer.w_out[...], np.float64)
    w_kv = np.asarray(layer.w_kv[...], np.float64)
    head_dim = w_query.shape[-1]
    mask = np.ones((batch, length), bool) if mask is None else np.asarray(mask)
    y = np.zeros_like(x)
    for b in range(batch):
        kv = x[b] @ w_kv
        keys, values = kv[:, :head_dim], kv[:, head_dim:]
        task = 0 if task_ids is None else int(task_ids[b])
        for i in np.flatnonzero(mask[b]):
            probs = softmax(token_logits(router, layer.routing, x[b, i], task))
            for e in np.argsort(-probs, kind="stable")[: layer.top_k]:
                q = x[b, i] @ w_query[e]
                allowed = [j for j in range(length) if mask[b, j] and (not causal or j <= i)]
                if not allowed:
                    continue
                scores = np.array([q @ keys[j] for j in allowed]) / math.sqrt(head_dim)
                weights = softmax(scores)
                head = sum(w * values[j] for w, j in zip(weights, allowed, strict=True))
                y[b, i] += probs[e] * head @ w_out[e]
    return y
