"""``dpbus demo``: start everything, send concurrent requests spread over the groups,
print one row per request, shut down cleanly. Exit 0 when every request got its
``done`` and every group served."""

from __future__ import annotations

import argparse
import asyncio

from rich.console import Console
from rich.table import Table

from dpbus.schemas import Done
from dpbus.services import bus
from dpbus.services.client import generate

PROMPTS = [
    "The quick brown fox", "Once upon a time", "NATS subjects are", "Data parallel attention",
    "A TPU VM host runs", "Continuous batching means", "The KV cache holds", "Hello, dpbus!",
]


async def over_http(console: Console, base: str, max_tokens: int) -> bool:
    """The same system through its OpenAI-compatible API: one streamed chat completion."""
    import json

    import httpx

    body = {"messages": [{"role": "user", "content": "Say hello over HTTP"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    # the whole command, to copy and run again (markup off: the JSON's brackets are text)
    console.print("[bold]over HTTP[/]:")
    console.print(curl_command(f"{base}/chat/completions", body), markup=False, highlight=False)
    pieces, usage, reason = [], None, None
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"{base}/chat/completions", json=body) as r:
            if r.status_code != 200:
                console.print(f"[red]HTTP {r.status_code}[/]: {(await r.aread()).decode()[:300]}")
                return False
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                doc = json.loads(line[6:])
                usage = doc.get("usage") or usage
                for choice in doc.get("choices", []):
                    pieces.append(choice["delta"].get("content") or "")
                    reason = choice["finish_reason"] or reason
    console.print(f"  {len(pieces)} server-sent events, finish_reason {reason}, usage {usage}")
    return reason is not None and usage is not None


def curl_command(url: str, body: dict) -> str:
    """A curl command line that sends ``body`` as JSON to ``url`` (streaming with -N)."""
    import json
    import shlex

    return f"curl -N {url} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def run_demo(a: argparse.Namespace) -> int:
    from dpbus.services.cli import cluster_from

    # soft_wrap: lines (log paths, URLs) are never cut; the table folds its cells to fit
    # whatever width the console has (80 columns without a terminal)
    console = Console(soft_wrap=True)
    cluster = cluster_from(a, say=console.print)

    async def main() -> int:
        seconds = await cluster.start()
        console.print(f"[bold]ready in {seconds:.1f}s[/]; sending {a.requests} concurrent requests")
        nc = await bus.connect_client(cluster.nats_url, auth=cluster.auth("client"))
        try:
            reqs = [{"text": PROMPTS[i % len(PROMPTS)], "rid": f"demo-{i}",
                     "sampling": {"max_new_tokens": a.max_new_tokens, "temperature": 0.0}}
                    for i in range(a.requests)]
            outs = await asyncio.gather(*(generate(nc, r, timeout=120) for r in reqs))
        finally:
            await nc.close()
        table = Table(title="dpbus demo")
        for col in ("rid", "group", "prompt", "tokens", "finish", "first token ms", "total ms", "tok/s"):
            table.add_column(col, overflow="fold")
        groups, ok = set(), 0
        for r, o in zip(reqs, outs):
            t = o.terminal
            if isinstance(t, Done):
                ok += 1
                groups.add(t.dp_rank)
                rate = t.completion_tokens / o.total_s if o.total_s else 0.0
                table.add_row(r["rid"], str(t.dp_rank), r["text"][:18], str(t.completion_tokens),
                              t.finish_reason.value, f"{o.ttft_s * 1000:.0f}", f"{o.total_s * 1000:.0f}", f"{rate:.0f}")
            else:
                table.add_row(r["rid"], "-", r["text"][:18], "-", f"error {getattr(t, 'code', None)}", "-", "-", "-")
        console.print(table)
        console.print(f"{ok}/{len(reqs)} requests done; groups that served: {sorted(groups)}")
        http_ok = await over_http(console, cluster.http_url, a.max_new_tokens) if cluster.http_url else True
        return 0 if ok == len(reqs) and len(groups) == a.dp_size and http_ok else 1

    try:
        return asyncio.run(main())
    except (RuntimeError, TimeoutError) as e:
        console.print(f"[red]demo failed:[/] {e}")
        return 1
    finally:
        console.print("shutting down ...")
        problems = cluster.stop()
        for line in problems:
            console.print(f"[yellow]warning:[/] {line}")
        console.print("all processes stopped")
