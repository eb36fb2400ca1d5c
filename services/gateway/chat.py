"""Chat messages to a prompt: the checkpoint's own chat template (a Jinja template, from
``chat_template.jinja``, ``chat_template.json`` or ``tokenizer_config.json``, rendered in a
sandbox), or a plain one for the built-in model."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import structlog

PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


# the roles every chat template knows; ``tool`` as well when the template names it
ROLES = ("system", "user", "assistant")
_NAMES_TOOL = re.compile(r"""["']tool["']""")


class TemplateError(ValueError):
    """The messages cannot be rendered (the template refused them)."""


def _token_text(value: Any) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in some configs
        return str(value.get("content", ""))
    return str(value or "")


class ChatTemplate:
    def __init__(self, source: str, bos: str = "", eos: str = "", builtin: bool = False) -> None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(source)
        self.bos, self.eos = bos, eos
        # a checkpoint's template writes BOS itself; the plain one leaves it to the tokenizer
        self.adds_bos = not builtin
        # a template that compares a role with "tool" renders tool results; the plain one knows none
        self.roles = ROLES + (("tool",) if not builtin and _NAMES_TOOL.search(source) else ())

    def role_of(self, role: str) -> str:
        """The role a message is rendered as: OpenAI's ``developer`` (its newer name for
        ``system``) is ``system`` to a template that does not name it."""
        return "system" if role == "developer" and "developer" not in self.roles else role

    def check_roles(self, roles: list[str]) -> None:
        """Refuse a role the template does not know (many templates would drop or mangle it
        without a word)."""
        for i, role in enumerate(roles):
            if self.role_of(role) not in self.roles:
                shown = role if len(role) <= 40 else role[:40] + "..."
                raise TemplateError(f"messages[{i}].role `{shown}` is not one this model's chat template knows "
                                    f"({', '.join(self.roles)})")

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                        eos_token=self.eos)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 - a template may fail in many ways
            raise TemplateError(f"the chat template failed: {e}") from None


def _named_default(source: Any) -> Any:
    """A list of named templates (``[{"name", "template"}]``) gives its ``default`` one."""
    if isinstance(source, list):
        return next((t["template"] for t in source if t.get("name") == "default"), source[0]["template"])
    return source


def template_source(path: Path) -> tuple[str, str] | None:
    """The checkpoint's chat template and the file it came from, looked for as transformers 5
    does: ``chat_template.jinja`` (what it saves now), then the older ``chat_template.json``,
    then ``chat_template`` in ``tokenizer_config.json``. None when there is none."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8"), jinja.name
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            source = _named_default(json.loads(f.read_text(encoding="utf-8")).get("chat_template"))
            if source:
                return source, name
    return None


def load_chat_template(model_path: str, log: Any = None) -> ChatTemplate:
    """The checkpoint's template when it has one, else the plain template (with a warning
    for a checkpoint: its model was likely trained on another format)."""
    if not model_path:
        return ChatTemplate(PLAIN_TEMPLATE, builtin=True)
    path = Path(model_path)
    found = template_source(path)
    if found is None:
        (log or structlog.get_logger()).warning(
            "no_chat_template", path=model_path,
            looked_for="chat_template.jinja, chat_template.json, tokenizer_config.json:chat_template",
            using="the plain 'role: content' template")
        return ChatTemplate(PLAIN_TEMPLATE, builtin=True)
    tok_cfg = path / "tokenizer_config.json"
    tokens = json.loads(tok_cfg.read_text(encoding="utf-8")) if tok_cfg.is_file() else {}
    return ChatTemplate(found[0], _token_text(tokens.get("bos_token")), _token_text(tokens.get("eos_token")))
