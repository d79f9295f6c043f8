"""Expert-parallel MoE: all-to-all bytes from the compiled HLO, and step time on 8 devices.

    python benchmarks/expert_parallel.py --out=benchmarks/results/expert_parallel.json

On a simulated 8-device CPU platform (set here, before jax is imported), for one MoE
layer forward:
  bytes   all-to-all bytes in the compiled program (per-device result sizes x devices)
  minimum 2 x tokens x K x cf x d_model x bytes per element (each kept slot out and back)
  ratio   bytes / minimum: 1.0 means no padding and no hidden extra collectives. Dropless
          pays E / K by design (C = S slots per expert, multitask_moe/parallel/
          expert_parallel.py), reported against the cf = 1 minimum.
and, for information, the forward+backward step time on the mesh vs one device (median
of --runs alternating pairs after warm-up). The 8 simulated devices share the host's
cores, so this time says nothing about real accelerators; it shows the sharded program
runs at all, and its overhead.
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


def build(args, capacity_factor):
    return mtm.MoE(
        args.d_model,
        args.d_hidden,
        args.experts,
        args.top_k,
        routing="tokens",
        capacity_factor=capacity_factor,
        group_size=args.length,
        rngs=nnx.Rngs(0),
    )


def all_to_all_bytes(args, capacity_factor, mesh) -> tuple[int, int, dict[str, int]]:
    """(all-to-all bytes over all devices, their count, collective counts) of a forward."""
    with jax.set_mesh(mesh):
        graphdef, state = nnx.split(build(args, capacity_factor))
        x = jnp.zeros((args.batch, args.length, args.d_model), jnp.float32)
        forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
        text = forward.lower(state, x).compile().as_text()
    per_device = hlo.collective_bytes(text, "all-to-all")
    return sum(per_device) * mesh.size, len(per_device), hlo.collective_counts(text)


def make_step(args, capacity_factor, mesh):
    """A jitted forward+backward of the layer, and its arguments (on the mesh if given)."""
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        graphdef, state = nnx.split(build(args, capacity_factor))
    x = jax.random.normal(jax.random.key(1), (args.batch, args.length, args.d_model))
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


def step_times(args, capacity_factor, mesh) -> tuple[float, float, float]:
    """(median s on the mesh, median s on one device, median of per-pair ratios).

    The two alternate, so drifts in machine load (a shared host) hit both sides alike.
    """
    sharded, single = make_step(args, capacity_factor, mesh), make_step(args, capacity_factor, None)
    for _ in range(2):  # compile, warm up
        sharded(), single()
    sharded_times, single_times = [], []
    for _ in range(args.runs):
        for call, times in ((single, single_times), (sharded, sharded_times)):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(sharded_times, single_times, strict=True)]
    return (
        statistics.median(sharded_times),
        statistics.median(single_times),
        statistics.median(ratios),
    )


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
    parser.add_argument("--mesh", default="2x4", help="data x expert, e.g. 2x4 or 1x8")
    args = parser.parse_args()
    data, expert = (int(n) for n in args.mesh.split("x"))
    mesh = parallel.make_mesh({"data": data, "expert": expert})
    tokens, element = args.batch * args.length, 4  # float32

    rows = []
    for capacity_factor in (1.0, 1.25, None):
        moved, count, counts = all_to_all_bytes(args, capacity_factor, mesh)
        minimum = 2 * tokens * args.top_k * (capacity_factor or 1.0) * args.d_model * element
        sharded, single, ratio = step_times(args, capacity_factor, mesh)
        rows.append(
            {
                "capacity_factor": capacity_factor,
                "all_to_all_ops": count,
                "all_gather_ops": counts["all-gather"],
                "all_to_all_bytes": moved,
                "minimum_bytes": minimum,
                "bytes_ratio": moved / minimum,
                "step_s_mesh": sharded,
                "step_s_one_device": single,
                "step_ratio_mesh_vs_one_device": ratio,
            }
        )

    print(
        f"MoE forward on mesh data={data} x expert={expert}: tokens={tokens} "
        f"D={args.d_model} H={args.d_hidden} E={args.experts} K={args.top_k} "
        f"group={args.length}, float32, simulated CPU devices"
    )
    print(
        f"{'cf':>8} {'a2a ops':>7} {'a2a bytes':>11} {'minimum':>11} {'ratio':>6} "
        f"{'step mesh':>10} {'step 1 dev':>10} {'ratio':>6}"
    )
    for row in rows:
        label = "dropless" if row["capacity_factor"] is None else f"{row['capacity_factor']}"
        print(
            f"{label:>8} {row['all_to_all_ops']:>7} {row['all_to_all_bytes']:>11,} "
            f"{row['minimum_bytes']:>11,.0f} {row['bytes_ratio']:>6.2f} "
            f"{row['step_s_mesh'] * 1e3:>8.1f}ms {row['step_s_one_device'] * 1e3:>8.1f}ms "
            f"{row['step_ratio_mesh_vs_one_device']:>6.2f}"
        )
    result = {"config": {**vars(args), "tokens": tokens, "devices": mesh.size}, "rows": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
