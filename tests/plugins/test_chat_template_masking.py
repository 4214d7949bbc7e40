"""Label masking of `chat_template` against independent ground truth, on six template families.

Ground truth comes from outside our span-finding code:
- the tokenizer's own generation mask (`return_assistant_tokens_mask`, from the
  `{% generation %}` tags of the test-asset templates) for assistant turns and their
  end-of-turn token, composed token by token for the `train_on_eos` policies;
- the messages themselves (decoded runs of trained tokens equal the trained contents) for
  trained user turns;
- `labels == input_ids` for `train_on_inputs`.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from sft.config import load_config_text
from sft.data.pipeline import build_render
from sft.data.sample import IGNORE_INDEX
from sft.data.tokenize import TokenizeOptions, process_chunk
from sft.testing import TEMPLATE_END_OF_TURN, build_tokenizer, template_tokenizer_kwargs

TEMPLATES = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"
STEMS = sorted(TEMPLATE_END_OF_TURN)
ALTERNATING_ONLY = {"mistral", "gemma"}

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Grüße 👋🏽 — 日本語"},
    {"role": "assistant", "content": "Tokyo 🗼, of course."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
]


def conversations(stem: str) -> dict[str, tuple[list[dict[str, Any]], Any]]:
    cases = {
        "system, two turns": ([SYSTEM, *TURNS], None),
        "no system, two turns": (list(TURNS), None),
        "one turn": (TURNS[:2], None),
        "empty assistant content": (
            [TURNS[0], {"role": "assistant", "content": ""}, *TURNS[2:]],
            None,
        ),
    }
    if stem not in ALTERNATING_ONLY:
        cases["consecutive same-role messages"] = (
            [
                TURNS[0],
                {"role": "user", "content": "Please answer."},
                TURNS[1],
                {"role": "assistant", "content": "Anything else?"},
            ],
            None,
        )
    if stem == "qwen_tools":
        cases["tool call and tool result"] = (TOOL_CONVERSATION, TOOLS)
    return cases


CASES = [(stem, name) for stem in STEMS for name in conversations(stem)]


def tokenizer_for(stem: str, **extra: Any) -> Any:
    kwargs = {**template_tokenizer_kwargs(stem), **extra}
    return build_tokenizer(chat_template=(TEMPLATES / f"{stem}.jinja").read_text(), **kwargs)


_TOKENIZERS: dict[str, Any] = {}


def cached_tokenizer(stem: str) -> Any:
    if stem not in _TOKENIZERS:
        _TOKENIZERS[stem] = tokenizer_for(stem)
    return _TOKENIZERS[stem]


def our_labels(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: Any = None,
    train_on_inputs: bool = False,
    **keys: Any,
) -> tuple[list[int], list[int]]:
    lines = ['base_model = "unused"', "[[datasets]]", 'path = "unused"', 'type = "chat_template"']
    for name, value in keys.items():
        lines.append(
            f"{name} = {value!r}".replace("'", '"')
            if not isinstance(value, list)
            else f"{name} = {value}".replace("'", '"')
        )
    config = load_config_text("\n".join(lines))
    render = build_render(config.datasets[0], tokenizer, config, _plugins())
    row = {"messages": messages}
    if tools is not None:
        row["tools"] = tools
    opts = TokenizeOptions(
        sequence_len=4096,
        excess_length_strategy="raise",
        invalid_rows="raise",
        train_on_inputs=train_on_inputs,
    )
    result = process_chunk([row], 0, render, tokenizer, opts)
    assert not result.errors, result.errors
    assert len(result.input_ids) == 1, result.dropped
    return result.input_ids[0], result.labels[0]


def _plugins() -> Any:
    from sft.manager import get_plugins

    return get_plugins()


def ground_truth(
    tokenizer: Any, messages: list[dict[str, Any]], tools: Any
) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    return ids, mask


def regions(mask: list[int]) -> list[tuple[int, int]]:
    found, start = [], None
    for i, flag in enumerate([*mask, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            found.append((start, i))
            start = None
    return found


def expected_for_policy(
    ids: list[int], mask: list[int], policy: str, marker_ids: set[int]
) -> list[int]:
    trained = [bool(m) for m in mask]
    spans = regions(mask)
    ends = [end - 1 for _, end in spans if ids[end - 1] in marker_ids]
    if policy in ("none", "last"):
        for position in ends:
            trained[position] = False
        if policy == "last" and ends:
            trained[ends[-1]] = True
    if policy == "all":
        for position, token in enumerate(ids):
            if token in marker_ids:
                trained[position] = True
    return [token if flag else IGNORE_INDEX for token, flag in zip(ids, trained, strict=True)]


def marker_ids(tokenizer: Any, stem: str) -> set[int]:
    return {
        tokenizer.convert_tokens_to_ids(t)
        for t in {TEMPLATE_END_OF_TURN[stem], tokenizer.eos_token}
    }


@pytest.mark.parametrize(("stem", "case"), CASES)
@pytest.mark.parametrize("policy", ["turn", "all", "last", "none"])
def test_assistant_labels_match_the_generation_mask(plugins, stem, case, policy):
    tokenizer = cached_tokenizer(stem)
    messages, tools = conversations(stem)[case]
    truth_ids, mask = ground_truth(tokenizer, messages, tools)
    ids, labels = our_labels(tokenizer, messages, tools, train_on_eos=policy)
    assert ids == truth_ids
    expected = expected_for_policy(ids, mask, policy, marker_ids(tokenizer, stem))
    assert labels == expected, (
        f"ours:     {trained_runs(tokenizer, ids, labels)}\nexpected: {trained_runs(tokenizer, ids, expected)}"
    )


def trained_runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    runs: list[str] = []
    for trained, group in itertools.groupby(
        zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX
    ):
        if trained:
            runs.append(tokenizer.decode([token for token, _ in group]))
    return runs


@pytest.mark.parametrize("stem", STEMS)
def test_train_on_inputs_trains_every_token(plugins, stem):
    tokenizer = cached_tokenizer(stem)
    messages, tools = conversations(stem)["system, two turns"]
    ids, labels = our_labels(tokenizer, messages, tools, train_on_inputs=True)
    assert labels == ids


@pytest.mark.parametrize("stem", STEMS)
@pytest.mark.parametrize("system", [True, False])
def test_trained_user_turns_train_their_content(plugins, stem, system):
    tokenizer = cached_tokenizer(stem)
    messages = [SYSTEM, *TURNS] if system else list(TURNS)
    ids, labels = our_labels(tokenizer, messages, roles_to_train=["user"], train_on_eos="none")
    runs = trained_runs(tokenizer, ids, labels)
    assert [r.strip() for r in runs] == [TURNS[0]["content"], TURNS[2]["content"]]
    _, mask = ground_truth(tokenizer, messages, None)
    assert not any(label != IGNORE_INDEX and m for label, m in zip(labels, mask, strict=True))


@pytest.mark.parametrize("stem", STEMS)
def test_user_and_assistant_together(plugins, stem):
    tokenizer = cached_tokenizer(stem)
    ids, labels = our_labels(
        tokenizer, list(TURNS), roles_to_train=["user", "assistant"], train_on_eos="none"
    )
    joined = "".join(trained_runs(tokenizer, ids, labels))
    for message in TURNS:
        assert message["content"].strip() in joined
    eot = tokenizer.convert_tokens_to_ids(TEMPLATE_END_OF_TURN[stem])
    assert eot not in [label for label in labels if label != IGNORE_INDEX]


def test_pad_equal_to_eos_keeps_the_eos_labels(plugins):
    tokenizer = tokenizer_for("chatml", pad_token="<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    _, labels = our_labels(tokenizer, list(TURNS))
    assert labels.count(tokenizer.eos_token_id) == 2  # one per assistant turn
