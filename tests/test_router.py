"""The ingest router, policy by policy, on a simulated cluster (no NATS, no processes).

The simulation: ``dp`` groups, each draining its outstanding tokens at a fixed rate
shared by up to ``slots`` running requests (the rest wait), publishing a LoadReport
every 0.5 s; requests arrive at random (Poisson) at ~85% of the cluster's capacity, a
skewed mix of 75% short requests (a few dozen tokens) and 25% long ones (several
hundred), each starting with one of 12 shared 32-token prefixes ("system prompts",
Zipf-popular). ``python tests/test_router.py`` prints the table of what each policy does.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
from collections import Counter, deque
from dataclasses import dataclass
from types import SimpleNamespace

import nats.errors
import pytest

from dpbus.schemas import ErrorCode
from dpbus.schemas.internal import LoadReport, SubmitAck, pack, page_hashes
from dpbus.services.ingest.router import POLICIES, Router

DT = 0.05          # simulated seconds per tick
REPORT_EVERY = 10  # ticks: a load report every 0.5 s, as the publishers do by default


# ---- the simulated cluster -----------------------------------------------------------------
class SimGroup:
    def __init__(self, g: int, slots: int = 8, rate: float = 400.0) -> None:
        self.g, self.slots, self.rate = g, slots, rate  # rate: tokens per tick
        self.waiting: deque[list[float]] = deque()
        self.running: list[list[float]] = []
        self.seq = 0

    def submit(self, cost: int) -> None:
        self.waiting.append([float(cost)])

    def tick(self) -> None:
        while self.waiting and len(self.running) < self.slots:
            self.running.append(self.waiting.popleft())
        if self.running:
            share = self.rate / len(self.running)
            for r in self.running:
                r[0] -= share
            self.running = [r for r in self.running if r[0] > 0]

    def outstanding(self) -> float:
        return sum(r[0] for r in (*self.waiting, *self.running))

    def queue(self) -> int:
        return len(self.waiting) + len(self.running)

    def report(self, now: float, ready: bool = True) -> LoadReport:
        self.seq += 1
        return LoadReport(self.g, self.seq, now, ready, len(self.waiting), len(self.running),
                          self.slots - len(self.running), int(self.outstanding()))


@dataclass
class Req:
    family: int
    prompt: list[int]
    new: int

    @property
    def cost(self) -> int:
        return len(self.prompt) + self.new


def requests(n: int, rng: random.Random, families: int = 12) -> list[Req]:
    prefixes = [[256] + [rng.randrange(256) for _ in range(31)] for _ in range(families)]
    weights = [1 / (k + 1) for k in range(families)]
    out = []
    for _ in range(n):
        f = rng.choices(range(families), weights)[0]
        if rng.random() < 0.75:
            prompt = prefixes[f] + [rng.randrange(256) for _ in range(rng.randint(1, 32))]
            out.append(Req(f, prompt, rng.randint(4, 16)))
        else:
            out.append(Req(f, prefixes[f] + [rng.randrange(256) for _ in range(rng.randint(200, 500))],
                           rng.randint(128, 256)))
    return out


def ratio(xs) -> float:
    return max(xs) / statistics.mean(xs)


def simulate(policy: str, dp: int = 4, seed: int = 1, n: int = 2000, load: float = 0.85) -> dict[str, float]:
    """Run the workload through a Router; max/mean ratios across groups, and the affinity hit rate."""
    rng = random.Random(seed)
    now = [0.0]
    router = Router(dp, policy, clock=lambda: now[0], rng=random.Random(seed))
    groups = [SimGroup(g) for g in range(dp)]
    reqs = requests(n, rng)
    per_second = load * dp * groups[0].rate / DT / statistics.mean(r.cost for r in reqs)
    t, arrivals = 0.0, deque()
    for r in reqs:
        t += rng.expovariate(per_second)
        arrivals.append((t, r))
    counts, tokens, load_sum, queue_sum = [0] * dp, [0] * dp, [0.0] * dp, [0] * dp
    last: dict[int, int] = {}
    hits = repeats = tick = 0
    while arrivals:
        if tick % REPORT_EVERY == 0:
            for grp in groups:
                router.on_load(grp.report(now[0]))
        while arrivals and arrivals[0][0] <= now[0]:
            r = arrivals.popleft()[1]
            g = router.order(r.prompt, r.new)[0]
            router.sent(g, r.cost)
            groups[g].submit(r.cost)
            counts[g] += 1
            tokens[g] += r.cost
            if r.family in last:
                repeats += 1
                hits += last[r.family] == g
            last[r.family] = g
        for i, grp in enumerate(groups):
            grp.tick()
            load_sum[i] += grp.outstanding()
            queue_sum[i] += grp.queue()
        tick += 1
        now[0] = tick * DT
    return {"count": ratio(counts), "tokens": ratio(tokens), "queue": ratio(queue_sum), "load": ratio(load_sum),
            "hit_rate": hits / repeats}


@pytest.fixture(scope="module")
def results() -> dict[str, list[dict[str, float]]]:
    return {p: [simulate(p, seed=s) for s in (1, 2, 3)] for p in POLICIES}


def worst(results, policy: str, key: str) -> float:
    return max(r[key] for r in results[policy])


def best(results, policy: str, key: str) -> float:
    return min(r[key] for r in results[policy])


# ---- what each policy promises -------------------------------------------------------------
def test_round_robin_balances_counts_but_not_tokens(results):
    assert worst(results, "round_robin", "count") == 1.0  # 2000 requests, 500 each
    # the load (time-averaged outstanding tokens) is what round robin does not see
    assert best(results, "round_robin", "load") > 1.2
    assert best(results, "round_robin", "load") > 1.15 * worst(results, "least_tokens", "load")


def test_least_tokens_balances_tokens(results):
    assert worst(results, "least_tokens", "tokens") < 1.05
    assert worst(results, "least_tokens", "load") < 1.06


def test_shortest_queue_balances_queues(results):
    assert worst(results, "shortest_queue", "queue") < worst(results, "round_robin", "queue")
    assert worst(results, "shortest_queue", "load") < best(results, "round_robin", "load")


def test_prefix_affinity_reuses_groups_within_its_skew(results):
    assert best(results, "prefix_affinity", "hit_rate") > 0.7
    for other in ("round_robin", "shortest_queue", "least_tokens"):
        assert worst(results, other, "hit_rate") < 0.45
    # it trades balance for cache hits, but only up to about affinity_skew (2.0)
    assert worst(results, "prefix_affinity", "load") < 2.3


def report(g: int, tokens: int = 0, waiting: int = 0, running: int = 0, ready: bool = True, seq: int = 1) -> LoadReport:
    return LoadReport(g, seq, 0.0, ready, waiting, running, 8 - running, tokens)


def fed(policy: str, dp: int = 4, seed: int = 0, loads=None, **kw) -> tuple[Router, list[float]]:
    now = [0.0]
    r = Router(dp, policy, clock=lambda: now[0], rng=random.Random(seed), **kw)
    for g in range(dp):
        r.on_load(report(g, tokens=(loads or [0] * dp)[g]))
    return r, now


def test_prefix_affinity_sends_a_prefix_home_until_home_is_overloaded():
    r, _ = fed("prefix_affinity", affinity_skew=2.0, prefix_tokens=8)
    prompt = list(range(8))
    home = r.order(prompt + [1, 2, 3], 10)[0]
    assert all(r.order(prompt + [9] * k, 10)[0] == home for k in range(20))  # only the prefix counts
    for g in range(4):  # home carries 2x the others' mean: still home
        r.on_load(report(g, tokens=2000 if g == home else 1000, seq=2))
    assert r.order(prompt, 10)[0] == home
    for g in range(4):  # beyond 2x: the least loaded group instead
        r.on_load(report(g, tokens=2100 if g == home else (100 if g == (home + 1) % 4 else 1000), seq=3))
    assert r.order(prompt, 10)[0] == (home + 1) % 4


def test_prefix_affinity_moves_only_the_prefixes_of_a_group_that_leaves():
    r, now = fed("prefix_affinity", stale_after=3.0)
    prompts = [[random.Random(i).randrange(256) for _ in range(32)] for i in range(400)]
    before = [r.order(p)[0] for p in prompts]
    assert min(Counter(before).values()) > 60  # the hash spreads prefixes over every group
    now[0] = 2.0
    for g in (0, 1, 3):
        r.on_load(report(g, seq=2))
    now[0] = 4.0  # group 2 is stale now
    after = [r.order(p)[0] for p in prompts]
    assert all(a == b for a, b in zip(after, before) if b != 2)
    assert 2 not in after


# ---- local counts between reports: bursts -------------------------------------------------
@pytest.mark.parametrize("policy", ["shortest_queue", "least_tokens", "prefix_affinity"])
def test_a_burst_between_two_reports_spreads_over_the_groups(policy):
    r, _ = fed(policy, loads=[1500, 0, 1000, 2000])  # the last reports; then 100 requests at once
    rng = random.Random(7)
    burst = requests(100, rng, families=100)
    sent_tokens, sent_count = Counter(), Counter()
    for q in burst:
        g = r.order(q.prompt, q.new)[0]
        r.sent(g, q.cost)
        sent_tokens[g] += q.cost
        sent_count[g] += 1
    assert len(sent_count) == 4 and max(sent_count.values()) < 45, sent_count
    total = [load + sent_tokens[g] for g, load in enumerate([1500, 0, 1000, 2000])]
    if policy == "least_tokens":  # balanced to within about one long request
        assert max(total) - min(total) < 2 * max(q.cost for q in burst), total
    if policy == "shortest_queue":
        assert max(sent_count.values()) - min(sent_count.values()) <= 1


def test_without_local_counts_the_burst_would_pile_onto_one_group():
    """The control for the test above: the same reports, but nothing counted between them."""
    r, _ = fed("least_tokens", loads=[1500, 0, 1000, 2000])
    assert {r.order(q.prompt, q.new)[0] for q in requests(100, random.Random(7), families=100)} == {1}


def test_a_report_restarts_the_local_counts_and_unsent_takes_back():
    r, _ = fed("least_tokens", dp=2)
    r.sent(0, 100)
    r.sent(0, 50)
    assert (r.groups[0].requests, r.groups[0].tokens) == (2, 150)
    r.unsent(0, 50)
    assert (r.groups[0].requests, r.groups[0].tokens) == (1, 100)
    r.on_load(report(0, tokens=120, waiting=1, seq=2))  # the report now includes what was sent
    assert (r.groups[0].requests, r.groups[0].tokens) == (1, 120)


def test_a_same_prefix_burst_stays_home_then_overflows():
    r, _ = fed("prefix_affinity", affinity_skew=2.0)
    prompt = [256] + list(range(40))
    picks = []
    for _ in range(40):
        g = r.order(prompt, 100)[0]
        r.sent(g, len(prompt) + 100)
        picks.append(g)
    home = picks[0]
    assert picks[:2] == [home, home]
    assert 0.35 < picks.count(home) / len(picks) < 0.6  # ~2x each other group's share
    assert len(set(picks)) == 4


# ---- several ingest instances ---------------------------------------------------------------
def test_two_ingest_instances_with_bursts_do_not_herd():
    routers = [fed("least_tokens", seed=s, loads=[400, 0, 200, 400])[0] for s in (1, 2)]
    bursts = [requests(50, random.Random(s), families=50) for s in (1, 2)]
    per_router = []
    total = Counter()
    for r, burst in zip(routers, bursts):
        mine = Counter()
        for q in burst:
            g = r.order(q.prompt, q.new)[0]
            r.sent(g, q.cost)
            mine[g] += q.cost
            total[g] += q.cost
        per_router.append(mine)
    assert all(len(m) == 4 for m in per_router)  # each instance spreads its own burst
    loads = [base + total[g] for g, base in enumerate([400, 0, 200, 400])]
    assert ratio(loads) < 1.35, loads


@pytest.mark.parametrize("policy", ["round_robin", "shortest_queue", "least_tokens"])
def test_instances_that_each_get_one_request_at_once_pick_different_groups(policy):
    """8 ingest instances, the same (near-equal) reports, one request each at the same
    moment: a deterministic argmin would send all 8 to one group; the routers choose at
    random among the groups within one request of the least loaded."""
    spread = []
    for trial in range(50):
        picks = []
        for i in range(8):
            r, _ = fed(policy, seed=trial * 100 + i, loads=[1000, 1010, 1000, 1005])
            picks.append(r.order([1] * 20, 20)[0])
        spread.append(len(set(picks)))
    assert statistics.mean(spread) > 3.0, spread  # uniform choice of 8 among 4: ~3.6 distinct


def test_rendezvous_is_the_same_in_every_instance():
    """Affinity must agree across instances: a prefix's home does not depend on the rng."""
    prompt = [256] + list(range(100, 140))
    homes = {fed("prefix_affinity", seed=s)[0].order(prompt, 8)[0] for s in range(20)}
    assert len(homes) == 1


# ---- prefix_affinity with the groups' prefix caches ------------------------------------------
PS = 16


def cache_report(g: int, held: list[list[int]], tokens: int = 0, seq: int = 2) -> LoadReport:
    """A report from a group whose prefix cache holds the whole pages of these prompts."""
    pages = {h for p in held for h in page_hashes(p, PS)}
    return LoadReport(g, seq, 0.0, True, 0, 0, 8, tokens, page_size=PS, cached=b"".join(sorted(pages)))


def test_prefix_affinity_prefers_the_group_holding_the_longest_prefix():
    r, _ = fed("prefix_affinity", prefix_tokens=8)
    system = [256] + list(range(100, 163))  # 64 tokens: 4 pages
    chat = system + list(range(10, 74))  # a conversation that went on for 4 more pages
    home = r.order(system + [1], 8)[0]  # where a prefix nobody holds goes
    a, b = (home + 1) % 4, (home + 2) % 4
    r.on_load(cache_report(a, [system]))
    r.on_load(cache_report(b, [chat]))
    assert r.cached_tokens(a, chat + [5]) == 64 and r.cached_tokens(b, chat + [5]) == 128
    assert r.order(chat + [5, 6], 8)[0] == b  # the whole conversation beats the system prompt
    assert r.order(system + [7] * 20, 8)[0] in (a, b)  # either holds the system prompt; not the rendezvous home
    r.on_load(cache_report(a, [system], tokens=50))
    assert r.order(system + [7] * 20, 8)[0] == b  # a tie goes to the less loaded
    assert r.order([9] * 70, 8)[0] == r.home([9] * 70, [0, 1, 2, 3])  # held nowhere: rendezvous as before


def test_prefix_affinity_passes_over_an_overloaded_group_that_holds_the_prefix():
    r, _ = fed("prefix_affinity")
    chat = [256] + list(range(100, 227))
    for g in range(4):
        r.on_load(LoadReport(g, 2, 0.0, True, 0, 0, 8, 1000, page_size=PS))
    r.on_load(cache_report(2, [chat], tokens=2000))  # 2x the others' mean: still preferred
    assert r.order(chat + [1], 8)[0] == 2
    r.on_load(cache_report(2, [chat], tokens=2100, seq=3))
    assert r.order(chat + [1], 8)[0] != 2


def test_prefix_affinity_remembers_what_it_sent_until_the_next_report():
    r, _ = fed("prefix_affinity")
    for g in range(4):
        r.on_load(cache_report(g, []))
    system = [256] + list(range(100, 163))
    first = r.order(system + [1, 2], 8)[0]
    r.sent(first, 100, system + [1, 2])
    assert r.cached_tokens(first, system + [3]) == 64
    r.on_load(cache_report(first, [], seq=3))  # the report (older than the prefill) restarts the memory
    assert r.cached_tokens(first, system + [3]) == 0


def conversations(policy: str, dp: int = 4, chats: int = 8, turns: int = 6, seed: int = 0) -> tuple[float, int]:
    """Multi-turn chats (a shared 512-token system prompt; each turn adds 64 user tokens
    and 48 answer tokens and re-sends the whole history) through a Router whose groups
    report exactly what they hold: the fraction of prompt tokens (after the first turn)
    found in the chosen group's cache, and how many groups were used."""
    rng = random.Random(seed)
    now = [0.0]
    r = Router(dp, policy, clock=lambda: now[0], rng=random.Random(seed))
    held: list[list[list[int]]] = [[] for _ in range(dp)]
    system = [256] + [rng.randrange(256) for _ in range(511)]
    histories = [list(system) for _ in range(chats)]
    hit = total = 0
    used: set[int] = set()
    for turn in range(turns):
        for g in range(dp):
            r.on_load(cache_report(g, held[g], tokens=sum(len(p) for p in held[g][-chats:]) // 4, seq=turn + 2))
        for c in range(chats):
            prompt = histories[c] + [rng.randrange(256) for _ in range(64)]
            g = r.order(prompt, 48)[0]
            hit += r.cached_tokens(g, prompt) if turn else 0
            total += len(prompt) if turn else 0
            r.sent(g, len(prompt) + 48, prompt)
            used.add(g)
            histories[c] = prompt + [rng.randrange(256) for _ in range(48)]
            held[g].append(histories[c])
    return hit / total, len(used)


def test_prefix_affinity_keeps_each_conversation_where_its_history_is():
    for seed in range(3):
        (affinity, groups), (spread, _) = conversations("prefix_affinity", seed=seed), conversations("least_tokens", seed=seed)
        print(f"hit rate: prefix_affinity {affinity:.2f} on {groups} groups, least_tokens {spread:.2f}")
        assert affinity > 0.88 and groups >= 3  # all but each turn's new tokens (the most possible), spread
        assert spread < affinity - 0.1


# ---- availability -----------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_stale_and_not_ready_groups_get_nothing_until_they_recover(policy):
    r, now = fed(policy, stale_after=3.0)
    now[0] = 2.0
    r.on_load(report(0, seq=2))
    r.on_load(report(1, ready=False, seq=2))
    r.on_load(report(3, seq=2))
    now[0] = 3.5  # group 2 last reported at 0.0
    picks = {g for i in range(200) for g in r.order([i % 256] * 40, 8)}
    assert picks == {0, 3}
    assert "not ready" in r.unavailable_reason(1) and "no load report for 3.5s" in r.unavailable_reason(2)
    r.on_load(report(1, seq=3))
    r.on_load(report(2, seq=3))
    assert {g for i in range(200) for g in r.order([i % 256] * 40, 8)[:1]} == {0, 1, 2, 3}


def test_all_unavailable_gives_an_empty_order():
    r, now = fed("least_tokens", stale_after=3.0)
    assert sorted(r.order()) == [0, 1, 2, 3]
    now[0] = 3.01
    assert r.order() == []
    r.on_load(report(2, ready=False, seq=2))
    assert r.order() == []


def test_before_any_report_every_group_is_tried():
    r = Router(3, "shortest_queue", rng=random.Random(0))
    assert sorted(r.order()) == [0, 1, 2]
    r.on_load(report(1))  # once reports exist, a group that never reported is unavailable
    assert r.order() == [1]


def test_round_robin_cycles_over_the_available_groups():
    r, _ = fed("round_robin", dp=3, seed=0)
    r.on_load(report(1, ready=False, seq=2))
    picks = [r.order()[0] for _ in range(6)]
    assert sorted(picks) == [0, 0, 0, 2, 2, 2] and picks[0] != picks[1]


def test_an_unknown_policy_is_refused_with_the_valid_names():
    with pytest.raises(ValueError, match="valid policies: round_robin, shortest_queue, least_tokens, prefix_affinity"):
        Router(2, "fastest")


# ---- ingest's use of the router (a fake bus, no NATS) --------------------------------------
class FakeBus:
    """Stands in for the connection in these unit tests of ingest's routing decisions;
    the same paths run against a real nats-server in tests/test_routing_e2e.py."""

    is_connected = True

    def __init__(self, dead: set[int] = frozenset()) -> None:
        self.dead = set(dead)
        self.asked: list[int] = []
        self.published: list[tuple[str, bytes]] = []

    async def request(self, subject: str, data: bytes, timeout: float) -> SimpleNamespace:
        g = int(subject.split(".")[2])
        self.asked.append(g)
        if g in self.dead:
            raise nats.errors.NoRespondersError
        return SimpleNamespace(data=pack(SubmitAck(True)))

    async def publish(self, subject: str, data: bytes) -> None:
        if not subject.startswith("_INBOX.echo"):  # the outbox's confirmations of its terminal answers
            self.published.append((subject, data))

    def new_inbox(self) -> str:
        return "_INBOX.echo"

    async def subscribe(self, subject: str, cb) -> None:
        pass


class FakeReplies:
    """What ingest's ``bus.Replies`` does, over the fake bus."""

    def __init__(self, nc: FakeBus) -> None:
        self.nc = nc

    async def request(self, subject: str, data: bytes, timeout: float) -> bytes:
        return (await self.nc.request(subject, data, timeout)).data

    async def send(self, subject: str, data: bytes, timeout: float, done) -> None:
        try:
            got = await self.request(subject, data, timeout)
        except Exception as e:  # noqa: BLE001 - handed to ``done``, as Replies does
            got = e
        done(got)


class NoLog:
    def __getattr__(self, _):
        return lambda *a, **k: None


def ingest(policy: str = "least_tokens", dead: set[int] = frozenset(), **kw):
    from dpbus.services.ingest.service import Ingest
    from dpbus.services.ledger import Ledger
    from tests.sim.memkv import MemoryKV
    from dpbus.services.settings import IngestSettings

    ing = Ingest(IngestSettings(dp_size=2, policy=policy, **kw), NoLog())
    from dpbus.services.bus import ClientOutbox

    ing.nc = FakeBus(dead)
    ing.ledger = Ledger(MemoryKV())  # where ingest records each request's name (the simulation's bucket)
    ing.replies = FakeReplies(ing.nc)
    ing.outbox = ClientOutbox(ing.nc, NoLog())
    return ing


def generate(ing, rid: str = "r", dp_rank: int | None = None) -> None:
    """One request through ingest's own handler (``on_generate``), to the end of its hand-over."""
    body = {"rid": rid, "input_ids": [256, 1, 2, 3], "sampling": {"max_new_tokens": 4}}
    if dp_rank is not None:
        body["dp_rank"] = dp_rank
    req = SimpleNamespace(subject="dpbus.generate", data=json.dumps(body).encode(),
                          _msg=SimpleNamespace(reply="_INBOX.client.1"))

    async def run() -> None:
        await ing.on_generate(req)
        while ing.tasks:
            await asyncio.gather(*ing.tasks)

    asyncio.run(run())


def answer(ing) -> dict:
    assert len(ing.nc.published) == 1
    return json.loads(ing.nc.published[0][1])


def test_ingest_refuses_an_unknown_policy_at_start_up(capsys):
    from dpbus.services.cli import main

    with pytest.raises(ValueError, match="unknown routing policy 'fastest'"):
        ingest("fastest")
    assert main(["ingest", "--policy", "fastest"]) == 2
    assert "valid values: round_robin, shortest_queue" in capsys.readouterr().err


def test_ingest_answers_unavailable_at_once_when_no_group_is():
    ing = ingest(load_stale_after=0.01)
    for g in (0, 1):
        ing.router.on_load(report(g))
    asyncio.run(asyncio.sleep(0.02))
    generate(ing)
    a = answer(ing)
    assert a["type"] == "error" and a["code"] == ErrorCode.UNAVAILABLE.value and "no load report" in a["message"]
    assert ing.nc.asked == []  # nothing was offered to a dead group
    ing.nc.published.clear()
    generate(ing, dp_rank=1)  # a pin does not revive it
    assert answer(ing)["code"] == "unavailable" and ing.nc.asked == []


def test_ingest_skips_unavailable_groups_and_counts_dispatches():
    ing = ingest()
    ing.router.on_load(report(0))
    ing.router.on_load(report(1, ready=False))
    for i in range(5):
        generate(ing, f"r{i}")
    assert ing.nc.asked == [0] * 5 and ing.nc.published == []  # accepted: the publisher answers
    stats = ing.stats()
    assert stats["dispatched"] == {"0": 5, "1": 0} and stats["policy"] == "least_tokens"
    assert stats["groups"]["1"]["available"] is False and stats["groups"]["1"]["why"] == "not ready"


def test_ingest_at_start_up_tries_every_group():
    ing = ingest(dead={0, 1})
    generate(ing)
    assert sorted(ing.nc.asked) == [0, 1]
    assert answer(ing)["code"] == "unavailable"
    ing = ingest(policy="round_robin", dead={0})
    for i in range(4):
        generate(ing, f"r{i}")
    assert ing.stats()["dispatched"] == {"0": 0, "1": 4} and ing.nc.published == []


if __name__ == "__main__":
    print("max/mean across groups, worst of 3 seeds; hit rate: mean")
    print(f"{'policy':16} {'count':>6} {'tokens':>6} {'queue':>6} {'load':>6} {'hit rate':>8}")
    for p in POLICIES:
        rs = [simulate(p, seed=s) for s in (1, 2, 3)]
        print(f"{p:16} " + " ".join(f"{max(r[k] for r in rs):6.3f}" for k in ("count", "tokens", "queue", "load"))
              + f" {statistics.mean(r['hit_rate'] for r in rs):8.2f}")


def test_a_deployment_coming_up_opens_when_every_group_is_ready_or_after_its_grace():
    """While group 1's workers still load (``starting``), group 0, ready 5 s, takes nothing:
    the first requests would all land on it. Group 1 ready, or group 0 ready past the grace,
    and both are served; a group restarting in a deployment already serving (the other
    ready for longer than the grace) holds up nothing."""
    now = [100.0]
    r = Router(2, "round_robin", start_grace=30.0, clock=lambda: now[0])

    def report(g: int, ready: bool, starting: bool = False, ready_for: float = 0.0) -> None:
        r.on_load(LoadReport(g, 1, 0.0, ready, 0, 0, 8, 0, starting=starting, ready_for=ready_for))

    report(0, True, ready_for=5.0)
    report(1, False, starting=True)
    assert r.order() == [] and r.opening(now[0]) == [1]
    assert "opens when group(s) [1] are ready" in r.unavailable_reason(0)
    assert r.unavailable_reason(1) == "starting (its workers are loading)"
    report(1, True, ready_for=0.0)
    assert sorted(r.order()) == [0, 1]

    now[0] += 24.0
    report(0, True, ready_for=29.0)
    report(1, False, starting=True)  # still loading
    assert r.order() == []
    now[0] += 1.5  # group 0 ready 30.5 s (its report 1.5 s old): open without group 1
    assert r.order() == [0] and r.unavailable_reason(0) is None

    report(0, True, ready_for=600.0)  # serving for long; group 1 restarted and loading again
    report(1, False, starting=True)
    assert r.order() == [0]
    report(1, False, starting=False)  # a group gone (not loading) never held anything up
    report(0, True, ready_for=1.0)
    assert r.order() == [0]
