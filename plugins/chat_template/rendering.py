"""`tokenizer.apply_chat_template(..., tokenize=False)`, without its per-call wrapper.

Preparing a chat dataset renders every conversation at least twice (the conversation, and the
prefix that fixes where the trained text starts). Half of each `apply_chat_template` call is
its wrapper, not the template: it looks the template up, rebuilds the special-token map, and
deep-copies the messages twice to turn message objects and rich values into plain JSON data.
Rows read from JSON or Arrow already are plain data, so `TemplateRenderer` hands them to the
same compiled template, with the same variables, directly. Anything else (a value that is not
a JSON scalar, list or string-keyed dict) goes through `apply_chat_template` itself.

The shortcut is checked before it is used: the first rows a renderer sees are rendered both
ways, and one difference turns it off for good (as does a transformers without the pieces it
uses). So the text trained on is always the text `apply_chat_template` writes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

CHECKED_RENDERS = 32  # renders compared with apply_chat_template before trusting the shortcut
_SCALARS = (str, int, float, bool, type(None))


def is_plain(value: Any) -> bool:
    """JSON data of exact built-in types: what the wrapper would hand over unchanged."""
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is list:
        return all(is_plain(item) for item in value)
    if kind is dict:
        return all(type(key) is str and is_plain(item) for key, item in value.items())
    return False


def _compiled_template(template: str) -> tuple[Any, Callable[[Any], Any]] | None:
    """transformers' own compiled template and reasoning-field aliasing, if this version has them."""
    try:
        from transformers.utils.chat_template_utils import (
            _alias_reasoning_fields,
            _compile_jinja_template,
        )

        return _compile_jinja_template(template), _alias_reasoning_fields
    except Exception:  # another transformers, or a template its compiler refuses: the wrapper says
        return None


class TemplateRenderer:
    """Renders conversations exactly as `apply_chat_template(tokenize=False)` does, faster."""

    def __init__(self, tokenizer: Any, template: str, variables: dict[str, Any]) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.variables = variables
        self.compiled: Any = None
        self.alias: Callable[[Any], Any] | None = None
        if (compiled := _compiled_template(template)) is not None:
            self.compiled, self.alias = compiled
        special = getattr(tokenizer, "special_tokens_map", None)
        self.special = dict(special) if isinstance(special, dict) else None
        self.unchecked = CHECKED_RENDERS
        if self.special is None or not is_plain(self.special) or not is_plain(variables):
            self.compiled = None

    def __call__(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Any,
        generation_prompt: bool,
        variables: dict[str, Any],
    ) -> str:
        if self._plain_call(messages, tools, variables):
            try:
                text = self._direct(messages, tools, generation_prompt, variables)
            except Exception:  # the wrapper raises the template's error itself, word for word
                return self._wrapped(messages, tools, generation_prompt, variables)
            if self.unchecked <= 0:
                return text
            self.unchecked -= 1
            reference = self._wrapped(messages, tools, generation_prompt, variables)
            if reference != text:
                self.compiled = None  # this transformers renders differently: never again
            return reference
        return self._wrapped(messages, tools, generation_prompt, variables)

    def _plain_call(
        self, messages: Sequence[dict[str, Any]], tools: Any, variables: dict[str, Any]
    ) -> bool:
        """Inputs the wrapper would pass to the template unchanged (tools: JSON schemas only)."""
        if self.compiled is None or not is_plain(variables):
            return False
        if tools is not None and not (type(tools) is list and all(type(t) is dict for t in tools)):
            return False
        return is_plain(tools) and all(type(m) is dict and is_plain(m) for m in messages)

    def _direct(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Any,
        generation_prompt: bool,
        variables: dict[str, Any],
    ) -> str:
        assert self.alias is not None and self.special is not None
        # The wrapper drops keys whose value is None (templates test for a key, not for None).
        chat = self.alias([{k: v for k, v in m.items() if v is not None} for m in messages])
        return str(
            self.compiled.render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=generation_prompt,
                **{**self.special, **self.variables, **variables},
            )
        )

    def _wrapped(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Any,
        generation_prompt: bool,
        variables: dict[str, Any],
    ) -> str:
        return str(
            self.tokenizer.apply_chat_template(
                list(messages),
                tools=tools,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **{**self.variables, **variables},
            )
        )
