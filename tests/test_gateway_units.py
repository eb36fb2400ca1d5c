"""The gateway's pieces without a server: chat templates, OpenAI request mapping."""

from __future__ import annotations

import json

import pytest

from schemas.errors import ErrorCode
from services.gateway import openai as oa
from services.gateway.chat import TemplateError, load_chat_template

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
