"""Expert-parallel MoE: the bytes each exchange moves (compiled HLO), and step times.

    python benchmarks/expert_parallel.py --out=benchmarks/results/expert_parallel.json

On a simulated 8-device CPU platform (set here, before jax is imported), for one MoE layer
on each mesh of --meshes (data x expert), every routing mode and exchange:
  capacity 1.0 and 1.25 with the all-to-all of slots; dropless with the all-to-all of
  C = S slots, the ring (all-gather, local experts, reduce-scatter) and the ragged
  all-to-all (GPU/TPU only: XLA has no CPU lowering, so its bytes are an estimate, the
  rows one routing of the benchmark input sends off-device, out and back; marked "~"
  and bytes_source "estimate" apart from the HLO-counted rows; it has no step time).
bytes    what one device sends over links in the forward's exchange collectives, from
         the compiled HLO: (n - 1) / n of an all-to-all's or all-gather's result and
         (n - 1) x a reduce-scatter's result, for an expert axis of n (the routing
         statistics' all-reduce over the batch axes is not counted)
minimum  2 x (n - 1) / n x tokens x K x d_model x bytes per element: each routed row
         leaves its device (uniform routing) and its output comes back, no padding
step     forward+backward step time on the mesh, median over --runs rounds in which
         every mode runs once (so machine load hits them alike), and its ratio to the
         capacity-1.25 step (median of the per-round ratios).
The 8 simulated devices share the host's cores: times say how much work each program
does and what its collectives cost in copies, not how it would run on accelerators.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = " ".join(
    [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    + ["--xla_force_host_platform_device_count=8"]
)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import multitask_moe as mtm  # noqa: E402
from multitask_moe import parallel  # noqa: E402
from multitask_moe.parallel import hlo  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


MODES = (  # (label, capacity factor, exchange)
    ("cf 1.0", 1.0, "all_to_all"),
    ("cf 1.25", 1.25, "all_to_all"),
    ("dropless a2a", None, "all_to_all"),
    ("dropless ring", None, "ring"),
    ("dropless ragged", None, "ragged"),
)
EXCHANGE_OPS = ("all-to-all", "all-gather", "reduce-scatter")
BASELINE = "cf 1.25"


def build(args, capacity_factor, exchange):
    return mtm.MoE(
        args.d_model,
        args.d_hidden,
        args.experts,
        args.top_k,
        routing="tokens",
        capacity_factor=capacity_factor,
        group_size=args.length,
        exchange=exchange,
        rngs=nnx.Rngs(0),
    )


def inputs(args):
    return jax.random.normal(jax.random.key(1), (args.batch, args.length, args.d_model))


def link_bytes(text: str, expert_shards: int) -> tuple[int, dict[str, int]]:
    """(bytes one device sends in the exchange collectives, op counts) of compiled HLO."""
    n = expert_shards
    sent = 0.0
    for kind in EXCHANGE_OPS:
        for size in hlo.collective_bytes(text, kind):
            sent += size * (n - 1) if kind == "reduce-scatter" else size * (n - 1) / n
    return round(sent), hlo.collective_counts(text)


def ragged_link_bytes(args, mesh) -> int:
    """An estimate of the bytes the ragged exchange sends from the busiest device: the
    rows one routing of the benchmark input sends to experts on other devices, out and
    back (no CPU lowering to count them from; another routing sends other rows)."""
    layer = build(args, None, "all_to_all")
    x = inputs(args)
    probs = jax.nn.softmax(layer.router(x, None), axis=-1)  # [B, L, E]
    experts = jax.lax.top_k(probs, args.top_k)[1]  # [B, L, K]
    n = mesh.shape["expert"]
    per_device = args.batch // mesh.size
    device = jnp.arange(args.batch) // per_device  # [B]: the device routing example b
    leaves = experts // (args.experts // n) != (device % n)[:, None, None]  # expert innermost
    rows_out = jnp.sum(leaves.reshape(mesh.size, -1), axis=1)  # [devices]
    return int(2 * jnp.max(rows_out) * args.d_model * 4)


def exchange_bytes(args, capacity_factor, exchange, mesh) -> tuple[int | None, dict]:
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(build(args, capacity_factor, exchange))
        x = jnp.zeros((args.batch, args.length, args.d_model), jnp.float32)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        text = forward.lower(state, x).compile().as_text()
    return link_bytes(text, mesh.shape["expert"])


def make_step(args, capacity_factor, exchange, mesh):
    """A jitted forward+backward of the layer, and its arguments (on the mesh if given)."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, state = nnx.split(build(args, capacity_factor, exchange))
    x = inputs(args)
    if mesh is not None:
        x = jax.device_put(x, parallel.batch_sharding(mesh))

    @jax.jit
    def step(state, x):
        def loss(state):
            y, aux = nnx.merge(graphdef, state)(x)
            return jnp.mean(jnp.square(y)) + 0.01 * aux["load_balance_loss"]

        return jax.grad(loss)(state)

    def call():
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            return jax.block_until_ready(step(state, x))

    return call


def step_times(args, steps: dict) -> dict[str, list[float]]:
    """label -> seconds per round; every step runs once per round, in turn."""
    for call in steps.values():  # compile, warm up
        call(), call()
    times = {label: [] for label in steps}
    for _ in range(args.runs):
        for label, call in steps.items():
            start = time.perf_counter()
            call()
            times[label].append(time.perf_counter() - start)
    return times


def measure_mesh(args, mesh_text: str) -> list[dict]:
    data, expert = (int(n) for n in mesh_text.split("x"))
    mesh = parallel.make_mesh({"data": data, "expert": expert})
    tokens_here, element = args.batch * args.length // mesh.size, 4  # float32
    minimum = 2 * (expert - 1) / expert * tokens_here * args.top_k * args.d_model * element
    runnable = {label: mode for label, *mode in MODES}
    if jax.default_backend() == "cpu":
        runnable.pop("dropless ragged")  # XLA has no CPU ragged all-to-all
    times = {}
    if args.runs > 0:  # --runs=0: bytes only (no step is compiled or timed)
        steps = {
            label: make_step(args, cf, exchange, mesh) for label, (cf, exchange) in runnable.items()
        }
        steps["one device, cf 1.25"] = make_step(args, 1.25, "auto", None)
        steps["one device, dropless"] = make_step(args, None, "auto", None)
        times = step_times(args, steps)
    rows = []
    for label, cf, exchange in MODES:
        if label in runnable:
            sent, counts = exchange_bytes(args, cf, exchange, mesh)
            note = "compiled HLO"
        else:
            sent, counts = ragged_link_bytes(args, mesh), None
            note = "estimate"  # rows one routing sends off-device: no CPU lowering
        step = statistics.median(times[label]) if label in times else None
        ratio = (
            statistics.median(a / b for a, b in zip(times[label], times[BASELINE], strict=True))
            if label in times
            else None
        )
        rows.append(
            {
                "mesh": mesh_text,
                "mode": label,
                "capacity_factor": cf,
                "exchange": exchange,
                "collectives": counts,
                "bytes_sent_per_device": sent,
                "bytes_source": note,
                "minimum_bytes": minimum,
                "bytes_ratio": sent / minimum,
                "step_s": step,
                "step_ratio_vs_cf_1_25": ratio,
            }
        )
    one_device = {
        label: statistics.median(times[label]) for label in times if label.startswith("one")
    }
    for row in rows:
        row["step_s_one_device"] = one_device
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64, help="tokens per routing group")
    parser.add_argument("--d_model", type=int, default=128)
    parser.add_argument("--d_hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--meshes", default="2x4,1x8", help="data x expert, comma-separated")
    args = parser.parse_args()

    rows = []
    for mesh_text in args.meshes.split(","):
        rows += measure_mesh(args, mesh_text)
    a2a = {r["mesh"]: r for r in rows if r["mode"] == "dropless a2a"}
    for row in rows:
        row["bytes_vs_dropless_a2a"] = (
            row["bytes_sent_per_device"] / a2a[row["mesh"]]["bytes_sent_per_device"]
        )

    print(
        f"MoE layer, tokens={args.batch * args.length} D={args.d_model} H={args.d_hidden} "
        f"E={args.experts} K={args.top_k} group={args.length}, float32, simulated CPU devices"
    )
    print(
        f"{'mesh':>5} {'mode':>16} {'bytes/dev':>10} {'/minimum':>8} {'/C=S a2a':>8} "
        f"{'step':>9} {'/cf 1.25':>8}"
    )
    for row in rows:
        step = "-" if row["step_s"] is None else f"{row['step_s'] * 1e3:.1f}ms"
        ratio = (
            "-" if row["step_ratio_vs_cf_1_25"] is None else f"{row['step_ratio_vs_cf_1_25']:.2f}"
        )
        mark = "~" if row["bytes_source"] == "estimate" else ""
        sent = f"{mark}{row['bytes_sent_per_device']:,}"
        print(
            f"{row['mesh']:>5} {row['mode']:>16} {sent:>10} "
            f"{row['bytes_ratio']:>8.2f} {row['bytes_vs_dropless_a2a']:>8.2f} {step:>9} {ratio:>8}"
        )
    print("~ estimate from one routing (no CPU lowering); every other row counts compiled HLO")
    for mesh_text in args.meshes.split(","):
        one = next(r for r in rows if r["mesh"] == mesh_text)["step_s_one_device"]
        print(f"{mesh_text}: " + ", ".join(f"{k}: {v * 1e3:.1f}ms" for k, v in one.items()))
    result = {"config": {**vars(args), "platform": jax.default_backend()}, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
