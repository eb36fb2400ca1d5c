"""Who runs a publisher, where each node sits, and which layouts are refused.

The expected values are written out by hand (not recomputed with the code under test),
so a wrong formula in ``services/topology.py`` fails here.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpbus.services.topology import (
    NodePlace,
    compute_dp_attention_world_info,
    group_leader,
    group_nodes,
    place_node,
    should_run_publisher,
)


def _args(node_rank: int, nnodes: int, dp_size: int, enable: bool = True) -> SimpleNamespace:
    return SimpleNamespace(enable_dp_attention=enable, node_rank=node_rank, nnodes=nnodes, dp_size=dp_size)


def _publishers(nnodes: int, dp_size: int, enable: bool = True) -> list[int]:
    return [r for r in range(nnodes) if should_run_publisher(_args(r, nnodes, dp_size, enable))]


def _names_number(message: str, n: int) -> bool:
    """True when ``n`` appears in ``message`` as a whole number (``2`` does not match ``12``)."""
    return re.search(rf"(?<![\d-]){re.escape(str(n))}(?!\d)", message) is not None


# (nnodes, dp_size) -> publisher node ranks, written out by hand.
PUBLISHERS = {
    (1, 1): [0],
    (2, 1): [0],
    (2, 2): [0, 1],
    (4, 2): [0, 2],
    (8, 2): [0, 4],
    (8, 4): [0, 2, 4, 6],
    (4, 4): [0, 1, 2, 3],
}
LAYOUTS = sorted(PUBLISHERS)


# ---------------------------------------------------------------------------------------
# Publishers


@pytest.mark.parametrize(("nnodes", "dp_size"), LAYOUTS)
def test_publishers_are_first_node_of_each_group(nnodes: int, dp_size: int) -> None:
    pubs = _publishers(nnodes, dp_size)
    assert pubs == PUBLISHERS[(nnodes, dp_size)]
    assert len(pubs) == dp_size  # exactly one per group


@pytest.mark.parametrize(("nnodes", "dp_size"), LAYOUTS)
def test_dp_attention_off_means_node_zero_only(nnodes: int, dp_size: int) -> None:
    assert _publishers(nnodes, dp_size, enable=False) == [0]


@pytest.mark.parametrize("nnodes", [1, 2, 3, 5, 8])
def test_dp_size_one_means_node_zero_only(nnodes: int) -> None:
    # dp 1 with DP attention on: one group, node 0 leads; any nnodes is valid.
    assert _publishers(nnodes, 1) == [0]


# ---------------------------------------------------------------------------------------
# The seed's rank math


@pytest.mark.parametrize(
    ("enable", "tp_rank", "tp_size", "dp_size", "expected"),
    [
        # (attn_tp_rank, attn_tp_size, attn_dp_rank)
        (True, 0, 1, 1, (0, 1, 0)),
        (True, 0, 8, 2, (0, 4, 0)),
        (True, 3, 8, 2, (3, 4, 0)),
        (True, 4, 8, 2, (0, 4, 1)),
        (True, 5, 8, 2, (1, 4, 1)),
        (True, 7, 8, 2, (3, 4, 1)),
        (True, 3, 8, 4, (1, 2, 1)),
        (True, 6, 8, 4, (0, 2, 3)),
        (True, 7, 8, 4, (1, 2, 3)),
        (True, 5, 8, 8, (0, 1, 5)),
        (True, 5, 8, 1, (5, 8, 0)),
        (True, 11, 12, 3, (3, 4, 2)),
        # disabled: the whole world is one group, whatever dp_size says
        (False, 5, 8, 2, (5, 8, 0)),
        (False, 3, 4, 4, (3, 4, 0)),
        (False, 0, 1, 1, (0, 1, 0)),
    ],
)
def test_world_info_table(enable, tp_rank, tp_size, dp_size, expected) -> None:
    assert compute_dp_attention_world_info(enable, tp_rank, tp_size, dp_size) == expected


@settings(max_examples=300, deadline=None)
@given(dp_size=st.integers(1, 16), per=st.integers(1, 16), data=st.data())
def test_world_info_matches_seed_formulas(dp_size: int, per: int, data) -> None:
    tp_size = dp_size * per
    tp_rank = data.draw(st.integers(0, tp_size - 1))
    attn_tp_rank, attn_tp_size, attn_dp_rank = compute_dp_attention_world_info(True, tp_rank, tp_size, dp_size)
    assert attn_tp_size == tp_size // dp_size == per
    assert attn_dp_rank == tp_rank // attn_tp_size
    assert attn_tp_rank == tp_rank % attn_tp_size
    assert attn_dp_rank * attn_tp_size + attn_tp_rank == tp_rank
    assert 0 <= attn_dp_rank < dp_size
    assert compute_dp_attention_world_info(False, tp_rank, tp_size, dp_size) == (tp_rank, tp_size, 0)


# ---------------------------------------------------------------------------------------
# place_node / group_nodes / group_leader agree with should_run_publisher


@pytest.mark.parametrize(("nnodes", "dp_size"), LAYOUTS)
def test_groups_partition_the_nodes(nnodes: int, dp_size: int) -> None:
    groups = [group_nodes(g, nnodes, dp_size) for g in range(dp_size)]
    flat = [r for grp in groups for r in grp]
    assert flat == list(range(nnodes))  # consecutive, disjoint, complete
    assert {len(grp) for grp in groups} == {nnodes // dp_size}
    assert [group_leader(g, nnodes, dp_size) for g in range(dp_size)] == PUBLISHERS[(nnodes, dp_size)]


@pytest.mark.parametrize(("nnodes", "dp_size"), LAYOUTS)
def test_place_node_consistent(nnodes: int, dp_size: int) -> None:
    per = nnodes // dp_size
    for r in range(nnodes):
        place = place_node(r, nnodes, dp_size)
        assert isinstance(place, NodePlace)
        assert place.node_rank == r
        assert place.nodes_per_group == per
        assert r in group_nodes(place.dp_rank, nnodes, dp_size)
        assert group_nodes(place.dp_rank, nnodes, dp_size).index(r) == place.attn_tp_rank
        assert place.is_leader == should_run_publisher(_args(r, nnodes, dp_size))
        assert place.is_leader == (group_leader(place.dp_rank, nnodes, dp_size) == r)


@pytest.mark.parametrize(("nnodes", "dp_size"), LAYOUTS)
def test_place_node_dp_attention_off(nnodes: int, dp_size: int) -> None:
    for r in range(nnodes):
        place = place_node(r, nnodes, dp_size, enable_dp_attention=False)
        assert place == NodePlace(node_rank=r, dp_rank=0, attn_tp_rank=r, nodes_per_group=nnodes)
        assert place.is_leader == (r == 0) == should_run_publisher(_args(r, nnodes, dp_size, enable=False))


def test_place_node_examples() -> None:
    assert place_node(5, 8, 2) == NodePlace(node_rank=5, dp_rank=1, attn_tp_rank=1, nodes_per_group=4)
    assert place_node(2, 4, 2) == NodePlace(node_rank=2, dp_rank=1, attn_tp_rank=0, nodes_per_group=2)
    assert place_node(3, 4, 4) == NodePlace(node_rank=3, dp_rank=3, attn_tp_rank=0, nodes_per_group=1)
    assert group_nodes(1, 8, 2) == [4, 5, 6, 7]
    assert group_nodes(3, 8, 4) == [6, 7]
    assert group_leader(1, 8, 2) == 4


@settings(max_examples=300, deadline=None)
@given(dp_size=st.integers(1, 12), per=st.integers(1, 12), data=st.data())
def test_publisher_count_equals_dp_size(dp_size: int, per: int, data) -> None:
    nnodes = dp_size * per
    node_rank = data.draw(st.integers(0, nnodes - 1), label="node_rank")
    # one node: leads exactly when it is the first of its group of `per` consecutive nodes
    assert should_run_publisher(_args(node_rank, nnodes, dp_size)) == (node_rank % per == 0)
    place = place_node(node_rank, nnodes, dp_size)
    assert (place.dp_rank, place.attn_tp_rank) == divmod(node_rank, per)
    # whole layout: exactly dp_size publishers, the group leaders
    pubs = _publishers(nnodes, dp_size)
    assert len(pubs) == dp_size
    assert pubs == [group_leader(g, nnodes, dp_size) for g in range(dp_size)]
    assert _publishers(nnodes, dp_size, enable=False) == [0]


# ---------------------------------------------------------------------------------------
# Bad layouts are refused with a message that names the numbers


@pytest.mark.parametrize(("nnodes", "dp_size"), [(6, 4), (3, 2), (5, 3), (2, 4), (7, 14)])
def test_uneven_split_refused(nnodes: int, dp_size: int) -> None:
    calls = [
        lambda: should_run_publisher(_args(0, nnodes, dp_size)),
        lambda: place_node(0, nnodes, dp_size),
        lambda: group_nodes(0, nnodes, dp_size),
        lambda: group_leader(0, nnodes, dp_size),
        lambda: compute_dp_attention_world_info(True, 0, nnodes, dp_size),
    ]
    for call in calls:
        with pytest.raises(ValueError) as ei:
            call()
        msg = str(ei.value)
        assert _names_number(msg, nnodes), msg
        assert _names_number(msg, dp_size), msg


@pytest.mark.parametrize(("node_rank", "nnodes", "dp_size"), [(9, 8, 2), (4, 4, 2), (-1, 4, 2), (3, 3, 1), (12, 4, 4)])
def test_rank_out_of_range_refused(node_rank: int, nnodes: int, dp_size: int) -> None:
    for enable in (True, False):
        with pytest.raises(ValueError) as ei:
            should_run_publisher(_args(node_rank, nnodes, dp_size, enable))
        msg = str(ei.value)
        assert _names_number(msg, node_rank) or str(node_rank) in msg, msg
        assert _names_number(msg, nnodes), msg
        with pytest.raises(ValueError) as ei:
            place_node(node_rank, nnodes, dp_size, enable_dp_attention=enable)
        assert str(node_rank) in str(ei.value) and _names_number(str(ei.value), nnodes)


@pytest.mark.parametrize("dp_size", [0, -3])
def test_dp_size_below_one_refused(dp_size: int) -> None:
    calls = [
        lambda: should_run_publisher(_args(0, 4, dp_size)),
        lambda: place_node(0, 4, dp_size),
        lambda: group_nodes(0, 4, dp_size),
        lambda: compute_dp_attention_world_info(True, 0, 4, dp_size),
    ]
    for call in calls:
        with pytest.raises(ValueError) as ei:
            call()
        assert str(dp_size) in str(ei.value) and "dp_size" in str(ei.value), str(ei.value)


@pytest.mark.parametrize(("group", "nnodes", "dp_size"), [(2, 4, 2), (-1, 4, 2), (5, 8, 4)])
def test_group_out_of_range_refused(group: int, nnodes: int, dp_size: int) -> None:
    for call in (group_nodes, group_leader):
        with pytest.raises(ValueError) as ei:
            call(group, nnodes, dp_size)
        assert str(group) in str(ei.value) and _names_number(str(ei.value), dp_size), str(ei.value)


def test_zero_nodes_refused() -> None:
    with pytest.raises(ValueError, match="0"):
        should_run_publisher(_args(0, 0, 1))
    with pytest.raises(ValueError, match="0"):
        should_run_publisher(_args(0, 0, 2))


# ---------------------------------------------------------------------------------------
# Regression: the seed's should_run_publisher made every node a publisher


def _seed_compute_dp_attention_world_info(enable_dp_attention, tp_rank, tp_size, dp_size):
    """Verbatim from the seed note (no validation)."""
    if not enable_dp_attention:
        return tp_rank, tp_size, 0
    attn_tp_size = tp_size // dp_size
    attn_dp_rank = tp_rank // attn_tp_size
    attn_tp_rank = tp_rank % attn_tp_size
    return attn_tp_rank, attn_tp_size, attn_dp_rank


def _seed_should_run_publisher(server_args) -> bool:
    """Verbatim from the seed note: the world size passed is ``dp_size`` (the bug)."""
    if not server_args.enable_dp_attention or server_args.dp_size == 1:
        return server_args.node_rank == 0
    attn_tp_rank, _, _ = _seed_compute_dp_attention_world_info(
        server_args.enable_dp_attention,
        server_args.node_rank,
        server_args.dp_size,
        server_args.dp_size,
    )
    return attn_tp_rank == 0


def _our_compute_with_seed_call(args) -> bool:
    """Ours, mutated to make the seed's call: what the fix must not do."""
    if not args.enable_dp_attention or args.dp_size == 1:
        return args.node_rank == 0
    attn_tp_rank, _, _ = compute_dp_attention_world_info(True, args.node_rank, args.dp_size, args.dp_size)
    return attn_tp_rank == 0


def test_seed_bug_every_node_is_a_publisher() -> None:
    # Documents the bug: with dp_size as the world size, attn_tp_size == 1, so every node leads.
    seed = [r for r in range(4) if _seed_should_run_publisher(_args(r, 4, 2))]
    assert seed == [0, 1, 2, 3]
    assert [r for r in range(8) if _seed_should_run_publisher(_args(r, 8, 2))] == list(range(8))
    # Ours: one publisher per group.
    assert _publishers(4, 2) == [0, 2]
    assert _publishers(8, 2) == [0, 4]


@pytest.mark.parametrize(("nnodes", "dp_size"), [(4, 2), (8, 2), (8, 4)])
def test_seed_call_would_fail_this_suite(nnodes: int, dp_size: int) -> None:
    """Whenever groups have several nodes, the seed's call cannot give the right answer:
    either it names a wrong set of publishers or (with our range check) it raises."""
    expected = PUBLISHERS[(nnodes, dp_size)]
    assert [r for r in range(nnodes) if _seed_should_run_publisher(_args(r, nnodes, dp_size))] != expected
    try:
        mutant = [r for r in range(nnodes) if _our_compute_with_seed_call(_args(r, nnodes, dp_size))]
    except ValueError:
        mutant = None
    assert mutant != expected
    assert _publishers(nnodes, dp_size) == expected


@pytest.mark.parametrize(("nnodes", "dp_size"), [(1, 1), (2, 1), (2, 2), (4, 4)])
def test_seed_and_ours_agree_when_groups_have_one_node_or_dp_is_one(nnodes: int, dp_size: int) -> None:
    # The bug only shows when a group spans several nodes; elsewhere the fix changes nothing.
    seed = [r for r in range(nnodes) if _seed_should_run_publisher(_args(r, nnodes, dp_size))]
    assert seed == _publishers(nnodes, dp_size) == PUBLISHERS[(nnodes, dp_size)]


def test_dpbus_up_stops_a_spanning_group_s_leader_after_its_members():
    """The leader hosts the group's JAX job: ``Cluster.stop`` signals it last (a member
    whose leader went first is ended by JAX itself, with SIGABRT)."""
    from pathlib import Path

    from dpbus.services.launcher import Cluster, Proc

    procs = [Proc(role, rank, None, Path()) for role, rank in (("worker", 0), ("worker", 1), ("worker", 2),
                                                                ("worker", 3), ("node", 2), ("publisher", 0),
                                                                ("ingest", 0))]
    spanning = Cluster(dp_size=2, nnodes=4)
    assert [p.name for p in procs if spanning.leads_a_spanning_group(p)] == ["worker-0", "worker-2", "node-2"]
    assert not any(Cluster(dp_size=2, nnodes=2).leads_a_spanning_group(p) for p in procs[:2])


def test_only_a_group_s_leader_connects_with_publisher_rights():
    """`dpbus node` on a member that runs no publisher connects as its own worker-g-r: a
    compromised member host cannot reach the ledger or any client's inbox, nor speak for
    another member (the permission matrix in test_deploy_configs shows what it is refused)."""
    from dpbus.services.launcher import node_user

    assert [node_user(r, 4, 2) for r in range(4)] == ["node-0", "worker-0-1", "node-1", "worker-1-3"]
    assert [node_user(r, 2, 2) for r in range(2)] == ["node-0", "node-1"]
    assert [node_user(r, 8, 2) for r in range(8)] == ["node-0", *[f"worker-0-{r}" for r in (1, 2, 3)],
                                                      "node-1", *[f"worker-1-{r}" for r in (5, 6, 7)]]
