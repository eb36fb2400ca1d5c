"""Every NATS subject dpbus uses, built in one place from a prefix (default ``dpbus``)."""

from __future__ import annotations

from dataclasses import dataclass

INGEST_QUEUE = "dpbus-ingest"


@dataclass(frozen=True)
class Subjects:
    prefix: str = "dpbus"

    # public
    @property
    def generate(self) -> str:
        return f"{self.prefix}.generate"

    @property
    def abort(self) -> str:
        return f"{self.prefix}.abort"

    # a client's own request subjects: the server lets only ``user`` publish on them, so a
    # request that arrives on one was sent by ``user`` (see services/identity.py)
    def generate_for(self, user: str) -> str:
        return f"{self.prefix}.generate.{user}"

    def abort_for(self, user: str) -> str:
        return f"{self.prefix}.abort.{user}"

    @property
    def all_generate(self) -> str:
        """Every client's own generate subject (ingest serves these and the plain one)."""
        return f"{self.prefix}.generate.*"

    @property
    def all_abort(self) -> str:
        return f"{self.prefix}.abort.*"

    # per DP group, all under {prefix}.dp.{g}.
    def group(self, g: int) -> str:
        return f"{self.prefix}.dp.{g}"

    def submit(self, g: int) -> str:
        """ingest -> publisher g: a validated request (request/reply; the reply is the ack)."""
        return f"{self.group(g)}.submit"

    def group_abort(self, g: int) -> str:
        """ingest -> publisher g: cancel a rid (request/reply)."""
        return f"{self.group(g)}.abort"

    def step(self, g: int) -> str:
        """publisher g -> every worker of g: the ordered steps."""
        return f"{self.group(g)}.step"

    def result(self, g: int, node_rank: int | str) -> str:
        """worker ``node_rank`` of g -> publisher g: its result of a step (the leader's carries
        the sampled tokens, every member's the digest). One subject per member, which only
        that member's NATS user may publish on: no member answers in another's name."""
        return f"{self.group(g)}.result.{node_rank}"

    def results(self, g: int) -> str:
        return self.result(g, "*")

    def replay(self, g: int) -> str:
        """worker of g -> publisher g: resend steps I missed (request/reply)."""
        return f"{self.group(g)}.replay"

    def worker_status(self, g: int, node_rank: int | str) -> str:
        """anyone -> worker ``node_rank`` of g: its heartbeat, on request (a nats.micro endpoint)."""
        return f"{self.group(g)}.worker.{node_rank}.status"

    def heartbeat(self, g: int, node_rank: int | str) -> str:
        """worker ``node_rank`` of g -> publisher g (and its peers): alive, ready, last step
        applied. One subject per member, as ``result``."""
        return f"{self.group(g)}.heartbeat.{node_rank}"

    def heartbeats(self, g: int) -> str:
        return self.heartbeat(g, "*")

    @property
    def all_heartbeats(self) -> str:
        """Every member of every group (a world's members watch each other)."""
        return f"{self.prefix}.dp.*.heartbeat.*"

    @staticmethod
    def member_of(subject: str) -> int | None:
        """The node rank a member's ``result``/``heartbeat`` subject names (None: not one)."""
        tail = subject.rsplit(".", 1)[-1]
        return int(tail) if tail.isdigit() else None

    def load(self, g: int) -> str:
        """publisher g -> ingest: queue lengths and readiness of the group."""
        return f"{self.group(g)}.load"

    @property
    def all_loads(self) -> str:
        return f"{self.prefix}.dp.*.load"
