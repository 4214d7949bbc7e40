"""The chat_template strategy's renderer writes exactly what `apply_chat_template` writes."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest

from sft.plugins.chat_template.rendering import TemplateRenderer
from sft.plugins.chat_template.templates import BUILTIN_TEMPLATES, builtin_template
from sft.testing import build_tokenizer

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CONVERSATIONS: list[tuple[list[dict[str, Any]], Any]] = [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], None),
    (
        [
            {"role": "system", "content": "Be brief.", "name": None},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "6", "thinking": "Add again."},
        ],
        None,
    ),
    (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {}}}
                ],
            },
            {"role": "tool", "content": "Sunny", "name": "get_weather"},
            {"role": "assistant", "content": "It is sunny."},
        ],
        TOOLS,
    ),
]


def templates() -> list[tuple[str, str]]:
    found = [(name, builtin_template(name)) for name in BUILTIN_TEMPLATES]
    found += [(path.stem, path.read_text()) for path in sorted(ASSETS.glob("*.jinja"))]
    return found


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return build_tokenizer(special_tokens=SPECIALS, eos_token="</s>", bos_token="<s>")


def both(
    renderer: TemplateRenderer,
    tokenizer: Any,
    template: str,
    messages: list[dict[str, Any]],
    tools: Any,
    prompt: bool,
    variables: dict[str, Any],
) -> tuple[str, str]:
    """(the renderer's text or error, apply_chat_template's text or error)."""

    def outcome(function: Any) -> str:
        try:
            return function()
        except Exception as exc:
            return f"raised {type(exc).__name__}: {exc}"

    ours = outcome(lambda: renderer(messages, tools, prompt, variables))
    theirs = outcome(
        lambda: tokenizer.apply_chat_template(
            messages,
            tools=tools,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=prompt,
            **{**renderer.variables, **variables},
        )
    )
    return ours, theirs


@pytest.mark.parametrize(("name", "template"), templates(), ids=lambda v: v[:20])
def test_direct_rendering_matches_apply_chat_template(tokenizer, name, template):
    renderer = TemplateRenderer(tokenizer, template, {"enable_thinking": False})
    assert renderer.compiled is not None, "the shortcut is not in use on this transformers"
    renderer.unchecked = 0  # the shortcut's own text, not the checked reference
    for messages, tools in CONVERSATIONS:
        for count in range(1, len(messages) + 1):
            for prompt in (False, True):
                for variables in ({}, {"eos_token": "\ue000eos\ue001"}):
                    ours, theirs = both(
                        renderer, tokenizer, template, messages[:count], tools, prompt, variables
                    )
                    assert ours == theirs, (name, count, prompt, variables)
    assert renderer.compiled is not None


def test_values_that_are_not_plain_data_go_through_apply_chat_template(tokenizer):
    template = builtin_template("chatml")
    renderer = TemplateRenderer(tokenizer, template, {})
    renderer.unchecked = 0
    recording = RecordingTemplate(renderer.compiled)
    renderer.compiled = recording
    for content, shortcut in (("x", 1), (("a", "b"), 0), (datetime.date(2026, 1, 1), 0)):
        messages = [{"role": "user", "content": content}, {"role": "assistant", "content": "y"}]
        recording.calls = 0
        ours, theirs = both(renderer, tokenizer, template, messages, None, False, {})
        assert ours == theirs  # chatml concatenates content: the tuple raises, the date prints
        assert recording.calls == shortcut, content
    # tools that are not JSON schemas: the wrapper's own error
    messages = [{"role": "user", "content": "x"}]
    recording.calls = 0
    ours, theirs = both(renderer, tokenizer, template, messages, ["not a schema"], False, {})
    assert ours == theirs and ours.startswith("raised ValueError")
    assert recording.calls == 0


class RecordingTemplate:
    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled
        self.calls = 0

    def render(self, **kwargs: Any) -> str:
        self.calls += 1
        return self.compiled.render(**kwargs)


def test_a_difference_while_checking_turns_the_shortcut_off(tokenizer):
    template = builtin_template("chatml")
    renderer = TemplateRenderer(tokenizer, template, {})
    other = TemplateRenderer(tokenizer, builtin_template("llama3"), {})
    renderer.compiled = other.compiled  # renders differently from apply_chat_template
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    ours, theirs = both(renderer, tokenizer, template, messages, None, False, {})
    assert ours == theirs  # the reference is returned while checking
    assert renderer.compiled is None  # and the shortcut is never used again
    assert renderer(messages, None, False, {}) == theirs


def test_template_errors_are_the_wrappers_own(tokenizer):
    template = "{{ raise_exception('only user turns, please') }}"
    renderer = TemplateRenderer(tokenizer, template, {})
    renderer.unchecked = 0
    messages = [{"role": "user", "content": "x"}]
    ours, theirs = both(renderer, tokenizer, template, messages, None, False, {})
    assert ours == theirs and "only user turns, please" in ours
