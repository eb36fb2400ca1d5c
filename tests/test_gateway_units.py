"""The gateway's pieces: chat templates and OpenAI request mapping without a server; then
the gateway itself, served from the test's event loop on a real nats-server, with the test
standing in for dpbus (what a hostile party could send it, and what it sends the bus)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re

import httpx
import msgspec
import pytest

from dpbus.schemas import Chunk, Done, Error, FinishReason
from dpbus.schemas.errors import ErrorCode
from dpbus.services import bus
from dpbus.services.gateway import openai as oa
from dpbus.services.gateway.app import Gateway
from dpbus.services.gateway.chat import TemplateError, load_chat_template
from dpbus.services.launcher import free_port
from dpbus.services.settings import GatewaySettings

LLAMA_LIKE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unknown role ' + m['role']) }}"
    "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_the_checkpoint_s_template_is_rendered_with_its_tokens(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": LLAMA_LIKE, "bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    t = load_chat_template(str(tmp_path))
    text = t.render([{"role": "system", "content": "be kind"}, {"role": "user", "content": "hi"}])
    assert text == "<s><|system|>be kind</s><|user|>hi</s><|assistant|>"
    assert t.adds_bos  # the template wrote BOS: the tokenizer must not add another
    with pytest.raises(TemplateError, match="unknown role tool"):
        t.render([{"role": "tool", "content": "x"}])


def test_named_templates_use_the_default_one(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "{{ messages[0].content }}!"}]}))
    assert load_chat_template(str(tmp_path)).render([{"role": "user", "content": "yo"}]) == "yo!"


def test_the_built_in_model_gets_a_plain_template(tmp_path):
    for where in ("", str(tmp_path)):  # no model path, or a checkpoint without a template
        t = load_chat_template(where)
        assert t.render([{"role": "user", "content": "hello"}]) == "user: hello\nassistant:"
        assert not t.adds_bos


def test_templates_run_sandboxed(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{{ messages.__class__.__mro__[1].__subclasses__() }}"}))
    with pytest.raises(TemplateError):
        load_chat_template(str(tmp_path)).render([{"role": "user", "content": "x"}])


def test_sampling_of_fills_the_context_without_max_tokens():
    req = oa.decode(b'{"prompt": "x", "temperature": 0.5, "stop": "END", "seed": 7}', oa.CompletionRequest)
    assert oa.sampling_of(req, prompt_tokens=10, max_seq_len=256) == {
        "max_new_tokens": 246, "temperature": 0.5, "seed": 7, "stop": ["END"]}
    req = oa.decode(b'{"prompt": "x", "max_tokens": 1000}', oa.CompletionRequest)
    assert oa.sampling_of(req, 10, 256)["max_new_tokens"] == 246  # never past the context
    with pytest.raises(oa.ApiError) as e:
        oa.sampling_of(req, 256, 256)
    assert e.value.status == 400 and e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("body, param", [
    (b'{"prompt": "x", "n": 3}', "n"),
    (b'{"prompt": "x", "logprobs": 2}', "logprobs"),
    (b'{"prompt": "x", "echo": true}', "echo"),
    (b'{"prompt": "x", "frequency_penalty": 0.5}', "frequency_penalty"),
])
def test_options_that_would_change_the_answer_are_refused_by_name(body, param):
    with pytest.raises(oa.ApiError) as e:
        oa.refuse_unsupported(oa.decode(body, oa.CompletionRequest))
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("prompt, ok", [
    ("text", True), ([1, 2, 3], True), (["one"], True), ([[1, 2]], True),
    ("", False), ([], False), (["a", "b"], False), ([1, -2], False), ([True], False), (5, False),
])
def test_prompts_one_string_or_one_list_of_ids(prompt, ok):
    req = oa.CompletionRequest(prompt=prompt)
    if ok:
        assert oa.prompt_of(req)
    else:
        with pytest.raises(oa.ApiError):
            oa.prompt_of(req)


def test_every_dpbus_error_code_has_an_http_status():
    for code in ErrorCode:
        err = oa.from_dpbus_error(code, "m")
        assert 400 <= err.status < 600 and err.body()["error"]["code"] == code.value
    assert oa.from_dpbus_error(ErrorCode.OVERLOADED, "").status == 429
    assert oa.from_dpbus_error(ErrorCode.UNAVAILABLE, "").status == 503


# ---- the gateway in this process, on a real nats-server, with the test playing dpbus -----
#
# The stand-in connects as `admin` and listens on every subject of its prefix: it sees the
# gateway's requests and aborts as ingest would, and answers (or forges answers) on the
# reply subjects as the services would. Nothing runs a model.

STAND_IN_PREFIX = "gwnone"  # a prefix of the test server's config that no real ingest serves
KEY = "sk-units"


class Log:
    """A structlog stand-in that keeps every line; `ready` is set when the gateway listens."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []
        self.ready = asyncio.Event()

    def __getattr__(self, level: str):
        def log(event: str, **kw) -> None:
            self.lines.append((level, event, kw))
            if event == "gateway_ready":
                self.ready.set()
        return log


class StandIn:
    def __init__(self, nc) -> None:
        self.nc = nc
        self.requests: asyncio.Queue = asyncio.Queue()  # (request, reply subject)
        self.aborts: asyncio.Queue = asyncio.Queue()  # abort bodies

    async def on_msg(self, msg) -> None:
        kind = msg.subject.split(".")[1]
        if kind == "generate":
            self.requests.put_nowait((msgspec.msgpack.decode(msg.data), msg.reply))
        elif kind == "abort":
            doc = json.loads(msg.data)
            self.aborts.put_nowait(doc)
            await self.nc.publish(msg.reply, json.dumps({"type": "abort", "rid": doc["rid"], "found": True}).encode())

    async def request(self) -> tuple[dict, str]:
        return await asyncio.wait_for(self.requests.get(), 30)

    async def send(self, reply: str, *answers) -> None:
        for a in answers:
            await self.nc.publish(reply, a if isinstance(a, bytes) else msgspec.msgpack.encode(a))
        await self.nc.flush()


@pytest.fixture
async def stand_in(nats_server):
    nc = await nats_server.connect("admin")
    s = StandIn(nc)
    await nc.subscribe(f"{STAND_IN_PREFIX}.>", cb=s.on_msg)
    await bus.at_server(nc)
    yield s
    await nc.close()


@contextlib.asynccontextmanager
async def gateway(nats_server, **settings):
    """A Gateway served from this event loop; ``.url`` is its root."""
    log = Log()
    cfg = GatewaySettings(**nats_server.settings("gateway"), prefix=STAND_IN_PREFIX, http_port=free_port(), **settings)
    gw = Gateway(cfg, log)
    stop = asyncio.Event()
    serving = asyncio.create_task(gw.run(stop))
    ready = asyncio.create_task(log.ready.wait())
    await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    if serving.done():
        ready.cancel()
        serving.result()
    gw.url, gw.log_lines = f"http://127.0.0.1:{cfg.http_port}", log.lines
    try:
        yield gw
    finally:
        stop.set()
        await serving


def done(rid: str, tokens: int = 1) -> Done:
    return Done(rid=rid, dp_rank=0, finish_reason=FinishReason.LENGTH, prompt_tokens=2, completion_tokens=tokens)


async def scrape(http: httpx.AsyncClient, url: str, **headers) -> dict[str, float]:
    text = (await http.get(f"{url}/metrics", headers=headers)).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(dpbus_gateway_\S+) (\S+)$", text, re.M)}


def sse_texts(body: str) -> list[dict]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


async def test_each_call_answers_on_its_own_unguessable_subject(nats_server, stand_in):
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        posts = [asyncio.create_task(http.post(f"{gw.url}/v1/completions", json={"prompt": p, "max_tokens": 1}))
                 for p in ("one", "two")]
        seen = [await stand_in.request() for _ in posts]
        for req, reply in seen:
            await stand_in.send(reply, done(req["rid"]))
        assert [(await p).status_code for p in posts] == [200, 200]
    replies = [reply for _, reply in seen]
    prefixes = {r.rsplit(".", 1)[0] for r in replies}
    tokens = [r.rsplit(".", 1)[1] for r in replies]
    assert len(prefixes) == 1 and prefixes.pop().startswith("_INBOX.gateway.")  # its private inbox
    assert len(set(tokens)) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", t) for t in tokens), tokens  # 128 random bits


async def test_answers_with_another_rid_are_dropped_and_counted(nats_server, stand_in):
    """Whoever learns a call's subject and publishes there (a forged chunk, a forged end, an
    error without rid once answers have come, bytes that decode to nothing) reaches no HTTP
    user: the stream is the call's own answers, and each forgery is counted."""
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        before = await scrape(http, gw.url)
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions",
                                             json={"prompt": "hi", "max_tokens": 2, "stream": True}))
        req, reply = await stand_in.request()
        rid = req["rid"]
        await stand_in.send(
            reply,
            Chunk(rid="cmpl-forged", index=0, token_ids=[70], text="FORGED"),
            Done(rid="cmpl-forged", dp_rank=1, finish_reason=FinishReason.STOP, prompt_tokens=1, completion_tokens=1),
            Chunk(rid=rid, index=0, token_ids=[104], text="h"),
            Error(code=ErrorCode.INTERNAL, message="FORGED"),  # no rid, after the call's first answer
            b"\x93not an answer",
            Chunk(rid=rid, index=1, token_ids=[105], text="i"),
        )
        await stand_in.send(reply.rsplit(".", 1)[0] + ".0", Chunk(rid=rid, index=2, token_ids=[1], text="x"))
        await stand_in.send(reply, done(rid, 2))
        r = await post
        after = await scrape(http, gw.url)
    assert r.status_code == 200 and "FORGED" not in r.text, r.text
    events = sse_texts(r.text)
    assert "".join(e["choices"][0]["text"] for e in events) == "hi"
    assert {e["id"] for e in events} == {rid} and events[-1]["choices"][0]["finish_reason"] == "length"

    def grew(reason: str) -> float:
        name = f'dpbus_gateway_dropped_answers_total{{reason="{reason}"}}'
        return after.get(name, 0) - before.get(name, 0)

    assert (grew("wrong_rid"), grew("undecodable"), grew("no_call")) == (3, 1, 1)
    assert any(event == "answer_dropped" and kw["reason"] == "wrong_rid" for _, event, kw in gw.log_lines)


async def test_a_refusal_without_rid_is_still_a_call_s_first_answer(nats_server, stand_in):
    """Ingest refuses some requests before it reads their rid (an unknown dp_rank): that
    error is the call's answer, not a forgery."""
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json={"prompt": "x", "dp_rank": 9}))
        _, reply = await stand_in.request()
        await stand_in.send(reply, Error(code=ErrorCode.UNKNOWN_DP_RANK, message="no group 9"))
        r = await post
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_dp_rank", r.text


async def aborts_counted(gw, http: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """The gateway's abort counters, once every abort it sent has its answer."""
    if gw.bus.tasks:
        await asyncio.wait(gw.bus.tasks)
    found = re.findall(r'^dpbus_gateway_aborts_total\{reason="(\w+)",result="(\w+)"\} (\S+)$',
                       (await http.get(f"{gw.url}/metrics")).text, re.M)
    return {(reason, result): float(n) for reason, result, n in found}


async def test_no_answer_in_time_is_504_and_aborts_the_request(nats_server, stand_in):
    async with gateway(nats_server, request_timeout=0.2) as gw, httpx.AsyncClient(timeout=30) as http:
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json={"prompt": "slow", "max_tokens": 9}))
        req, reply = await stand_in.request()  # ...and nothing answers
        r = await post
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout", r.text
        assert await asyncio.wait_for(stand_in.aborts.get(), 30) == {"rid": req["rid"], "reply": reply}
        assert await aborts_counted(gw, http) == {("timeout", "found"): 1}


async def test_a_client_gone_before_the_first_answer_aborts_the_request(nats_server, stand_in):
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json={"prompt": "bye", "max_tokens": 9}))
        req, reply = await stand_in.request()
        post.cancel()  # closes the connection
        with contextlib.suppress(asyncio.CancelledError):
            await post
        assert await asyncio.wait_for(stand_in.aborts.get(), 30) == {"rid": req["rid"], "reply": reply}
        assert await aborts_counted(gw, http) == {("client_gone", "found"): 1}


async def test_a_client_gone_mid_stream_aborts_the_request(nats_server, stand_in):
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        async def first_chunk() -> tuple[dict, str]:
            req, reply = await stand_in.request()
            await stand_in.send(reply, Chunk(rid=req["rid"], index=0, token_ids=[104], text="h"))
            return req, reply

        answering = asyncio.create_task(first_chunk())  # the response starts with the first answer
        body = {"messages": [{"role": "user", "content": "go on"}], "max_tokens": 9, "stream": True}
        async with http.stream("POST", f"{gw.url}/v1/chat/completions", json=body) as r:
            req, reply = await answering
            async for line in r.aiter_lines():
                if line.startswith("data: ") and '"h"' in line:
                    break
        assert await asyncio.wait_for(stand_in.aborts.get(), 30) == {"rid": req["rid"], "reply": reply}
        assert await aborts_counted(gw, http) == {("client_gone", "found"): 1}


async def test_the_api_key_is_compared_in_constant_time(nats_server, stand_in, monkeypatch):
    compared = []
    real = hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    async with gateway(nats_server, api_key=KEY) as gw, httpx.AsyncClient(timeout=30) as http:
        for headers in ({}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer sk-\u00e9".encode()},
                        {"Authorization": KEY}):
            r = await http.post(f"{gw.url}/v1/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (headers, r.text)
        assert (await http.get(f"{gw.url}/v1/models")).status_code == 401
        assert len(compared) == 5  # every check went through compare_digest
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                             headers={"Authorization": f"Bearer {KEY}"}))
        req, reply = await stand_in.request()
        await stand_in.send(reply, done(req["rid"]))
        assert (await post).status_code == 200


async def raw_post(url: str, head: list[str], body: list[bytes]) -> tuple[int, dict]:
    """POST over a bare socket: send ``head`` and ``body`` (maybe unfinished), read the answer."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write("\r\n".join(["POST /v1/completions HTTP/1.1", f"Host: {host}", *head, "", ""]).encode())
        for part in body:
            writer.write(part)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            headers[name.lower()] = value.strip()
        return status, json.loads(await reader.readexactly(int(headers["content-length"])))
    finally:
        writer.close()


async def test_bodies_over_the_limit_get_413_before_they_are_read(nats_server, stand_in):
    async with gateway(nats_server, max_body_bytes=4096) as gw, httpx.AsyncClient(timeout=30) as http:
        # a Content-Length over the limit: refused before any of the body is sent
        status, doc = await raw_post(gw.url, ["Content-Type: application/json", "Content-Length: 100000000"], [])
        assert status == 413 and doc["error"]["code"] == "request_too_large", doc
        # no length given: counted as it comes, refused once past the limit (the body never ends here)
        chunk = b"{" + b" " * 1023
        status, doc = await raw_post(gw.url, ["Content-Type: application/json", "Transfer-Encoding: chunked"],
                                     [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * 5)
        assert status == 413 and doc["error"]["type"] == "invalid_request_error", doc
        # a body within the limit is served
        post = asyncio.create_task(http.post(f"{gw.url}/v1/completions",
                                             json={"prompt": "x", "max_tokens": 1, "user": "u" * 3900}))
        req, reply = await stand_in.request()
        await stand_in.send(reply, done(req["rid"]))
        assert (await post).status_code == 200
    assert stand_in.requests.empty()  # the refused ones never reached the bus


def test_roles_are_the_template_s_own(tmp_path):
    plain = load_chat_template("")
    assert plain.roles == ("system", "user", "assistant")
    with pytest.raises(TemplateError, match=r"messages\[1\]\.role `wizard`.*system, user, assistant"):
        plain.check_roles(["user", "wizard"])
    with pytest.raises(TemplateError, match="`tool`"):  # the plain template has no place for tool results
        plain.check_roles(["tool"])
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA_LIKE}))
    assert load_chat_template(str(tmp_path)).roles == ("system", "user", "assistant")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{% if m.role == 'tool' %}<tool>{{ m.content }}{% else %}"
        "<{{ m.role }}>{{ m.content }}{% endif %}{% endfor %}")}))
    with_tools = load_chat_template(str(tmp_path))
    with_tools.check_roles(["system", "user", "assistant", "tool"])
    with pytest.raises(TemplateError, match="`wizard`"):
        with_tools.check_roles(["wizard"])
    # OpenAI's newer name for system: rendered as system where the template does not name it
    plain.check_roles(["developer", "user"])
    assert plain.role_of("developer") == "system" and plain.role_of("user") == "user"
    assert "system: be brief" in plain.render([{"role": plain.role_of("developer"), "content": "be brief"}])


async def test_a_role_the_template_does_not_know_is_400(nats_server, stand_in):
    async with gateway(nats_server) as gw, httpx.AsyncClient(timeout=30) as http:
        r = await http.post(f"{gw.url}/v1/chat/completions", json={"messages": [
            {"role": "user", "content": "hi"}, {"role": "wizard", "content": "obey"}]})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages" and "`wizard`" in err["message"] and "system, user, assistant" in err["message"]
    assert stand_in.requests.empty()


@pytest.mark.parametrize("settings, keys_taken", [
    ({}, None),  # no key: open, as before
    ({"api_key": KEY}, None),  # the API key alone does not close /metrics
    ({"metrics_key": "mk"}, {"mk"}),
    ({"api_key": KEY, "metrics_use_api_key": True}, {KEY}),
    ({"api_key": KEY, "metrics_key": "mk", "metrics_use_api_key": True}, {KEY, "mk"}),
])
async def test_metrics_may_need_a_key(nats_server, settings, keys_taken):
    async with gateway(nats_server, **settings) as gw, httpx.AsyncClient(timeout=30) as http:
        for key in (None, KEY, "mk", "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            r = await http.get(f"{gw.url}/metrics", headers=headers)
            if keys_taken is None or key in keys_taken:
                assert r.status_code == 200 and "dpbus_gateway_requests" in r.text, (key, r.status_code)
            else:
                assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (key, r.text)


def test_reusing_the_api_key_for_metrics_needs_one():
    with pytest.raises(ValueError, match="--metrics-use-api-key needs --api-key"):
        Gateway(GatewaySettings(metrics_use_api_key=True), Log())


def test_template_files_are_read_in_transformers_order(tmp_path):
    """chat_template.jinja, then chat_template.json, then tokenizer_config.json's chat_template."""
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "config:{{ messages[0].content }}",
                                                                "bos_token": "<s>"}))
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "json:{{ messages[0].content }}"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}jinja:{{ messages[0].content }}")
    msgs = [{"role": "user", "content": "hi"}]
    assert load_chat_template(str(tmp_path)).render(msgs) == "<s>jinja:hi"
    (tmp_path / "chat_template.jinja").unlink()
    assert load_chat_template(str(tmp_path)).render(msgs) == "json:hi"
    (tmp_path / "chat_template.json").unlink()
    assert load_chat_template(str(tmp_path)).render(msgs) == "config:hi"


def test_a_checkpoint_without_template_gets_the_plain_one_with_a_warning(tmp_path):
    from structlog.testing import capture_logs

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    with capture_logs() as logs:
        t = load_chat_template(str(tmp_path))
        load_chat_template("")  # the built-in model: plain by design, no warning
    assert t.render([{"role": "user", "content": "hi"}]) == "user: hi\nassistant:"
    assert [e["event"] for e in logs] == ["no_chat_template"]
    assert logs[0]["log_level"] == "warning" and logs[0]["path"] == str(tmp_path)


def test_template_saved_by_transformers_renders_as_transformers_does(tmp_path):
    """transformers 5 saves a tokenizer's template as chat_template.jinja; we render it as
    its apply_chat_template does."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    raw = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "x": 2}, unk_token="x"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>")
    tok.chat_template = LLAMA_LIKE
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((tmp_path / "tokenizer_config.json").read_text())
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert load_chat_template(str(tmp_path)).render(msgs) == want
