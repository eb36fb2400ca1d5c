"""Who is who in a DP-attention deployment.

A *node* is one worker process (one JAX controller: a TPU VM host in production).
``nnodes`` nodes are split into ``dp_size`` attention data-parallel groups of
``nnodes // dp_size`` consecutive nodes each. Inside a group, the node with
``attn_tp_rank == 0`` leads: it runs the group's publisher and reports step results.

The rank math is the seed's; the seed's bug (calling it with ``dp_size`` as the
world size, which makes every node a publisher) is fixed by using ``nnodes``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def _check_layout(world_size: int, dp_size: int) -> None:
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got dp_size={dp_size}")
    if world_size < 1:
        raise ValueError(f"the world size must be >= 1, got {world_size}")
    if world_size % dp_size != 0:
        raise ValueError(
            f"{world_size} ranks cannot be split into dp_size={dp_size} equal groups "
            f"({world_size} % {dp_size} = {world_size % dp_size})"
        )


def compute_dp_attention_world_info(
    enable_dp_attention: bool, tp_rank: int, tp_size: int, dp_size: int
) -> tuple[int, int, int]:
    """Return ``(attn_tp_rank, attn_tp_size, attn_dp_rank)`` for one rank.

    With DP attention disabled the whole world is one group: ``(tp_rank, tp_size, 0)``.
    """
    if not enable_dp_attention:
        return tp_rank, tp_size, 0
    _check_layout(tp_size, dp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"rank {tp_rank} is out of range for a world of {tp_size} (0..{tp_size - 1})")
    attn_tp_size = tp_size // dp_size
    attn_dp_rank = tp_rank // attn_tp_size
    attn_tp_rank = tp_rank % attn_tp_size
    return attn_tp_rank, attn_tp_size, attn_dp_rank


def should_run_publisher(args: Any) -> bool:
    """True when this node runs its group's publisher.

    ``args`` is any object with ``enable_dp_attention``, ``dp_size``, ``node_rank`` and
    ``nnodes``. The world size is the number of nodes (not ``dp_size``, as in the seed).
    """
    if not args.enable_dp_attention or args.dp_size == 1:
        _check_layout(args.nnodes, 1)
        if not 0 <= args.node_rank < args.nnodes:
            raise ValueError(f"node_rank {args.node_rank} is out of range for nnodes={args.nnodes}")
        return args.node_rank == 0
    attn_tp_rank, _, _ = compute_dp_attention_world_info(True, args.node_rank, args.nnodes, args.dp_size)
    return attn_tp_rank == 0


@dataclass(frozen=True)
class NodePlace:
    """Where one node sits: its group, its rank inside the group, the group's size."""

    node_rank: int
    dp_rank: int
    attn_tp_rank: int
    nodes_per_group: int

    @property
    def is_leader(self) -> bool:
        return self.attn_tp_rank == 0


def place_node(node_rank: int, nnodes: int, dp_size: int, enable_dp_attention: bool = True) -> NodePlace:
    """Locate ``node_rank`` in the layout; raises ``ValueError`` naming the numbers."""
    if not enable_dp_attention:
        dp_size = 1
    attn_tp_rank, attn_tp_size, attn_dp_rank = compute_dp_attention_world_info(True, node_rank, nnodes, dp_size)
    return NodePlace(node_rank, attn_dp_rank, attn_tp_rank, attn_tp_size)


def dp_groups(dp_size: int, enable_dp_attention: bool = True) -> int:
    """How many DP groups (publishers, schedulers, KV caches) a layout has: ``dp_size``
    with DP attention, one without it (every node is then in the one JAX job)."""
    return dp_size if enable_dp_attention else 1


def group_nodes(group: int, nnodes: int, dp_size: int) -> list[int]:
    """The node ranks that form DP group ``group``, leader first."""
    _check_layout(nnodes, dp_size)
    if not 0 <= group < dp_size:
        raise ValueError(f"group {group} is out of range for dp_size={dp_size} (0..{dp_size - 1})")
    per = nnodes // dp_size
    return list(range(group * per, (group + 1) * per))


def group_leader(group: int, nnodes: int, dp_size: int) -> int:
    """The node rank that leads group ``group`` (and runs its publisher)."""
    return group_nodes(group, nnodes, dp_size)[0]
