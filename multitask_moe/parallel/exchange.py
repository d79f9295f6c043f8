"""How tokens reach the experts of other devices: the collectives of an expert-parallel layer.

A sparse layer's forward is written once for the tokens of one device; an Exchange is the
only part of it that knows about the mesh. Three exchanges, all exact:

  all_to_all  slots [G, E, C, X] go through one all-to-all over 'expert' to the devices
              holding their experts and one back. Slots have a static size, which suits
              capacity routing; dropless routing must then use C = S slots (a token picks
              each expert at most once), E / K times the rows that are really routed.
  ring        ring of experts, for dropless token choice: every device all-gathers the
              tokens of its 'expert' group, routes them itself (the router is
              replicated; no expert ids or gates cross the links), runs its local
              experts on the rows routed to them (the grouped matmul over sorted rows,
              no slot padding), and a reduce-scatter sums each token's expert outputs
              back onto the device it came from. Bytes per device: 2 (n - 1) / n x n N
              x D for an expert axis of n (n N tokens in the group), whatever E / K is,
              plus a task id per example and the padding mask where the routing has
              them (moe/sharded_dropless.py).
  ragged      jax.lax.ragged_all_to_all, for dropless token choice: each device sends
              every other exactly the rows routed to its experts and gets the outputs
              back; the minimum bytes. XLA lowers it for GPU and TPU only (not CPU).

`resolve` turns the layer setting ("auto" or one of the three) into the exchange a step
uses; `auto` is all_to_all for capacity routing, ragged for dropless on GPU/TPU and ring
for dropless on CPU (benchmarks/expert_parallel.py measures the choice).

Shape legend (per device): N tokens, D d_model, E experts, E_loc = E / n experts held
here, n size of the 'expert' axis, R rows, X row width.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from multitask_moe.parallel.mesh import EXPERT_AXIS

EXCHANGES = ("auto", "all_to_all", "ring", "ragged")
# The exchanges that move a dropless token-choice routing without slot padding.
SORTED_EXCHANGES = ("ring", "ragged")


def check_exchange(exchange: str) -> str:
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r} is not allowed; allowed: {EXCHANGES}")
    return exchange


def resolve(setting: str, *, dropless_token_choice: bool, backend: str | None = None) -> str:
    """The exchange a step uses: `setting` for dropless token choice, else all_to_all.

    "auto": ragged on GPU/TPU (the minimum bytes), ring on CPU (no ragged lowering there).
    backend: the platform the program is built for (default: jax.default_backend()).
    """
    check_exchange(setting)
    if not dropless_token_choice:
        return "all_to_all"
    if setting != "auto":
        return setting
    backend = backend or jax.default_backend()
    return "ring" if backend == "cpu" else "ragged"


@dataclasses.dataclass(frozen=True)
class Exchange:
    """Token movement between devices, and the sums of routing statistics.

    expert_shards: size of the 'expert' axis (1: every expert is on this device).
    batch_axes: the axes tokens are split over; statistics are summed over them.
    kind: "all_to_all", "ring" or "ragged" (resolved; see the module docstring).
    """

    expert_shards: int = 1
    batch_axes: tuple[str, ...] = ()
    kind: str = "all_to_all"

    @property
    def sorted_rows(self) -> bool:
        """Whether a dropless routing may use the sorted-rows layout (no C = S slots):
        always on one device, across devices with the ring and ragged exchanges."""
        return self.expert_shards == 1 or self.kind in SORTED_EXCHANGES

    @property
    def moves_rows(self) -> bool:
        """Whether sorted rows cross devices (ring or ragged on a sharded expert axis)."""
        return self.expert_shards > 1 and self.kind in SORTED_EXCHANGES

    def to_experts(self, slots: jax.Array) -> jax.Array:
        """[G, E, C, X] -> [n * G, E_loc, C, X]: every device's slots of the experts here."""
        if self.expert_shards == 1:
            return slots
        return jax.lax.all_to_all(slots, EXPERT_AXIS, split_axis=1, concat_axis=0, tiled=True)

    def from_experts(self, slots: jax.Array) -> jax.Array:
        """Inverse of to_experts: [n * G, E_loc, C, X] -> [G, E, C, X]."""
        if self.expert_shards == 1:
            return slots
        return jax.lax.all_to_all(slots, EXPERT_AXIS, split_axis=0, concat_axis=1, tiled=True)

    def total(self, stats):
        """A pytree of per-device sums -> the sums over every device's tokens."""
        return jax.lax.psum(stats, self.batch_axes) if self.batch_axes else stats

    def expert_shard(self) -> jax.Array:
        """This device's index on the 'expert' axis (it holds experts from index * E_loc)."""
        return jax.lax.axis_index(EXPERT_AXIS)

    def gather(self, x: jax.Array) -> jax.Array:
        """[M, ...] on each device of the 'expert' group -> [n * M, ...], in axis order."""
        return jax.lax.all_gather(x, EXPERT_AXIS, axis=0, tiled=True)

    def scatter_sum(self, x: jax.Array) -> jax.Array:
        """[n * M, ...] partial sums -> [M, ...]: this device's block summed over the group
        (the reduce-scatter that undoes `gather`)."""
        return jax.lax.psum_scatter(x, EXPERT_AXIS, scatter_dimension=0, tiled=True)

    def send_ragged(self, operand, output, input_offsets, send_sizes, output_offsets, recv_sizes):
        """jax.lax.ragged_all_to_all over 'expert' (arguments as there)."""
        return ragged_all_to_all(
            operand,
            output,
            input_offsets,
            send_sizes,
            output_offsets,
            recv_sizes,
            axis_name=EXPERT_AXIS,
        )


LOCAL = Exchange()

# The collective the ragged exchange calls. Tests on CPU, where XLA has no lowering for
# it, replace it with `emulated_ragged_all_to_all` to check everything around it.
ragged_all_to_all = jax.lax.ragged_all_to_all


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """jax.lax.ragged_all_to_all's semantics from an all-gather (every device's operand
    reaches every device, so it moves n times the bytes): a reference for tests.

    operand [R_in, ...], output [R_out, ...]; the four offset/size arrays [n * m] hold m
    slices per destination device (see jax.lax.ragged_all_to_all).
    """
    del recv_sizes  # implied by the senders' send_sizes
    num_devices = jax.lax.axis_size(axis_name)
    per_device = input_offsets.shape[0] // num_devices
    here = jax.lax.axis_index(axis_name)
    everyone = lambda a: jax.lax.all_gather(a, axis_name)  # [n, ...]
    operands = everyone(operand)  # [n, R_in, ...]

    def to_me(a):  # [n, n * m] -> [n, m]: what each source sends to this device
        return jax.lax.dynamic_slice_in_dim(everyone(a), here * per_device, per_device, axis=1)

    starts, sizes, targets = to_me(input_offsets), to_me(send_sizes), to_me(output_offsets)
    rows = jnp.arange(output.shape[0])[:, None, None]  # [R_out, 1, 1]
    hit = (rows >= targets) & (rows < targets + sizes)  # [R_out, n, m]
    source_row = starts + rows - targets  # [R_out, n, m]
    which = jnp.argmax(hit.reshape(rows.shape[0], -1), axis=1)  # [R_out]: first hit
    source = which // per_device
    row = jnp.take_along_axis(source_row.reshape(rows.shape[0], -1), which[:, None], 1)[:, 0]
    received = operands[source, jnp.clip(row, 0, operand.shape[0] - 1)]
    covered = jnp.any(hit, axis=(1, 2)).reshape((-1,) + (1,) * (output.ndim - 1))
    return jnp.where(covered, received, output)


@dataclasses.dataclass(frozen=True)
class RaggedLayout:
    """Where each device's rows go in a ragged exchange, from the [n, E] routed counts.

    Senders hold their rows sorted by expert with no padding (expert e from
    send_offsets[e]). On the device holding expert e, e's rows from every source are one
    run (sources in axis order), padded to a whole number of `tile` rows, so the grouped
    matmul runs over them as over a single device's sorted rows.
    """

    send_offsets: jax.Array  # [E] int32: start of expert e's rows in this device's rows
    send_sizes: jax.Array  # [E] int32: rows this device routes to expert e
    target_offsets: jax.Array  # [E] int32: where they land on e's device
    recv_sizes: jax.Array  # [n * E_loc] int32: rows from source s for local expert l
    recv_offsets: jax.Array  # [n * E_loc] int32: where those rows are here
    return_offsets: jax.Array  # [n * E_loc] int32: where they go back to on source s
    row_bounds: jax.Array  # [E_loc + 1] int32: local expert l's run here

    @classmethod
    def from_counts(cls, counts: jax.Array, shard: jax.Array, tile: int) -> RaggedLayout:
        """counts [n, E] int32: rows of source s routed to expert e; shard: this device's
        index on 'expert'; tile: rows per tile of the grouped matmul."""
        counts = counts.astype(jnp.int32)
        num_devices, num_experts = counts.shape
        local = num_experts // num_devices
        exclusive = lambda a, axis: jnp.cumsum(a, axis=axis) - a
        padded = (-(-jnp.sum(counts, axis=0) // tile) * tile).reshape(num_devices, local)
        run_start = exclusive(padded, 1).reshape(num_experts)  # [E] on its device
        target = run_start + exclusive(counts, 0)  # [n, E]: source s's rows of e land here
        send_offsets = exclusive(counts, 1)  # [n, E]: in source s's sorted rows
        mine = lambda a: jax.lax.dynamic_slice_in_dim(a, shard * local, local, axis=-1)
        here_start = mine(run_start)  # [E_loc]
        return cls(
            send_offsets=send_offsets[shard],
            send_sizes=counts[shard],
            target_offsets=target[shard],
            recv_sizes=mine(counts).reshape(-1),
            recv_offsets=mine(target).reshape(-1),
            return_offsets=mine(send_offsets).reshape(-1),
            row_bounds=jnp.concatenate([here_start, here_start[-1:] + padded[shard, -1:]]),
        )
