"""chat_template labels where the old marker-string search failed, against independent truth.

Ground truth is the `{% generation %}` span of the test-asset templates, in characters
(`render_jinja_template(..., return_assistant_tokens_mask=True)`), turned into token labels here
by offset overlap. It covers:
- templates on a *foreign* tokenizer, whose end-of-turn marker is several ordinary tokens (a
  chat template chosen for a base model), including Phi-3's eos-at-the-end on a tokenizer whose
  eos is another family's turn marker;
- reasoning: Qwen3 (kept after the last user message) and DeepSeek-R1 (dropped everywhere), as
  `reasoning_content` and as `<think>…</think>` inside `content`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from conftest import write_jsonl

from sft.config import load_config_text
from sft.data.pipeline import build_render, prepare_datasets
from sft.data.sample import IGNORE_INDEX
from sft.data.tokenize import TokenizeOptions, process_chunk
from sft.errors import ConfigError, DataError
from sft.plugins.chat_template.templates import BUILTIN_TEMPLATES
from sft.testing import TEMPLATE_END_OF_TURN, build_tokenizer, template_tokenizer_kwargs

TEMPLATES = Path(__file__).resolve().parent.parent / "assets" / "chat_templates"
POLICIES = ["turn", "all", "last", "none"]


def tokenizer_for(template: str, family: str) -> Any:
    """The `template` asset on the tokenizer of model family `family`."""
    text = (TEMPLATES / f"{template}.jinja").read_text()
    return build_tokenizer(chat_template=text, **template_tokenizer_kwargs(family))


def labels_for(tokenizer: Any, messages: list[dict[str, Any]], **keys: Any) -> tuple[list, list]:
    render = renderer(tokenizer, **keys)
    opts = TokenizeOptions(
        sequence_len=4096,
        excess_length_strategy="raise",
        invalid_rows="raise",
        train_on_inputs=False,
    )
    result = process_chunk([{"messages": messages}], 0, render, tokenizer, opts)
    assert len(result.input_ids) == 1, result
    return result.input_ids[0], result.labels[0]


def renderer(tokenizer: Any, **keys: Any) -> Any:
    lines = ['base_model = "unused"', "[[datasets]]", 'path = "unused"', 'type = "chat_template"']
    lines += [f"{name} = {json.dumps(value)}" for name, value in keys.items()]
    config = load_config_text("\n".join(lines))
    from sft.manager import get_plugins

    return build_render(config.datasets[0], tokenizer, config, get_plugins())


def generation_spans(tokenizer: Any, messages: list[dict[str, Any]]) -> tuple[str, list]:
    from transformers.utils.chat_template_utils import render_jinja_template

    (text,), (spans,) = render_jinja_template(
        [messages],
        chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True,
        **tokenizer.special_tokens_map,
    )
    return text, [tuple(s) for s in spans]


def expected_labels(
    tokenizer: Any, text: str, spans: list[tuple[int, int]], marker: str, policy: str
) -> list[int]:
    """Compose the generation spans with a `train_on_eos` policy, in characters, then label
    every token overlapping a trained character."""
    trained: list[tuple[int, int]] = []
    ends = [(end - len(marker), end) for _, end in spans if text[end - len(marker) : end] == marker]
    assert len(ends) == len(spans), "every generation span ends with the marker"
    for (start, _), end in zip(spans, ends, strict=True):
        trained.append((start, end[0]))
    if policy == "turn":
        trained += ends
    elif policy == "last":
        trained.append(ends[-1])
    elif policy == "all":
        for needle in {marker, tokenizer.eos_token}:
            position = text.find(needle)
            while position != -1:
                trained.append((position, position + len(needle)))
                position = text.find(needle, position + 1)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for token, (a, b) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        hit = any(a < end and start < b for start, end in trained if end > start)
        labels.append(token if hit else IGNORE_INDEX)
    return labels


def runs(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    out = []
    for trained, group in itertools.groupby(
        zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX
    ):
        if trained:
            out.append(tokenizer.decode([token for token, _ in group]))
    return out


SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan?"},
    {"role": "assistant", "content": "Tokyo, of course."},
]
EMPTY_FIRST = [TURNS[0], {"role": "assistant", "content": ""}, *TURNS[2:]]
CONVERSATIONS = {
    "system, two turns": [SYSTEM, *TURNS],
    "two turns": list(TURNS),
    "one turn": TURNS[:2],
    "empty assistant content": EMPTY_FIRST,
    "empty last assistant content": [*TURNS[:3], {"role": "assistant", "content": ""}],
}
# (template, tokenizer family): the template's end marker is not a token of that vocabulary.
FOREIGN = [
    ("phi3", "chatml"),
    ("phi3", "llama3"),
    ("gemma", "chatml"),
    ("llama3", "chatml"),
    ("chatml", "llama3"),
]


@pytest.mark.parametrize(("template", "family"), FOREIGN)
@pytest.mark.parametrize("case", sorted(CONVERSATIONS))
@pytest.mark.parametrize("policy", POLICIES)
def test_foreign_tokenizer_labels_match_the_generation_spans(
    plugins, template, family, case, policy
):
    tokenizer = tokenizer_for(template, family)
    marker = TEMPLATE_END_OF_TURN[template]
    assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) > 1  # ordinary pieces
    messages = CONVERSATIONS[case]
    text, spans = generation_spans(tokenizer, messages)
    ids, labels = labels_for(tokenizer, messages, train_on_eos=policy)
    expected = expected_labels(tokenizer, text, spans, marker, policy)
    assert labels == expected, (
        f"ours:     {runs(tokenizer, ids, labels)}\nexpected: {runs(tokenizer, ids, expected)}"
    )


def test_phi3_eos_at_the_end_is_not_the_end_of_the_first_turn(plugins):
    """The review's case: Phi-3's template on a tokenizer whose eos (<|im_end|>) is a ChatML
    turn marker. Each assistant turn ends at its own <|end|>; the final eos belongs to no turn."""
    tokenizer = tokenizer_for("phi3", "chatml")
    ids, labels = labels_for(tokenizer, [SYSTEM, *TURNS])
    assert runs(tokenizer, ids, labels) == ["Paris.<|end|>", "Tokyo, of course.<|end|>"]
    ids, labels = labels_for(tokenizer, TURNS[:2])
    assert runs(tokenizer, ids, labels) == ["Paris.<|end|>"]


@pytest.mark.parametrize(("template", "family"), [("gemma", "chatml"), ("llama3", "chatml")])
def test_multi_token_markers_follow_one_rule_after_empty_and_non_empty_turns(
    plugins, template, family
):
    tokenizer = tokenizer_for(template, family)
    marker = TEMPLATE_END_OF_TURN[template]
    ids, labels = labels_for(tokenizer, EMPTY_FIRST, train_on_eos="turn")
    trained = runs(tokenizer, ids, labels)
    assert [r.strip() for r in trained] == [marker, f"Tokyo, of course.{marker}"]
    ids, labels = labels_for(tokenizer, EMPTY_FIRST, train_on_eos="none")
    assert [r.strip() for r in runs(tokenizer, ids, labels)] == ["Tokyo, of course."]


# -- built-in templates ------------------------------------------------------------------------


def family_tokens(
    bos: str | None, eos: str, *turn_tokens: str, add_bos: bool = False
) -> dict[str, Any]:
    """`build_tokenizer` arguments for a model family whose bos, eos and turn tokens are special."""
    specials = [token for token in (bos, eos, *turn_tokens) if token is not None]
    return {"bos_token": bos, "eos_token": eos, "special_tokens": specials, "add_bos": add_bos}


DEEPSEEK_TOKENS = family_tokens(
    "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
)
GEMMA4_TOKENS = family_tokens(
    "<bos>", "<eos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>", "<|think|>", add_bos=True
)
COHERE_TURN = ("<|START_OF_TURN_TOKEN|>", "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>")
EXAONE_TOKENS = family_tokens(None, "[|endofturn|]", "[|system|]", "[|user|]", "[|assistant|]")
MISTRAL_TOKENS = family_tokens("<s>", "</s>", "[INST]", "[/INST]")
# Built-in template -> (its model family's tokenizer, the end-of-turn marker, what the model
# writes before an earlier answer and before the last one). The model's text starts where the
# generation prompt ends: Mistral's and Jamba's end before the space ahead of the answer; Qwen3's
# opens a think block (<think>\n\n) that the answer after the last question closes.
BUILTIN_FAMILIES: dict[str, tuple[dict[str, Any], str, tuple[str, str]]] = {
    "chatml": (template_tokenizer_kwargs("chatml"), "<|im_end|>", ("", "")),
    "llama3": (template_tokenizer_kwargs("llama3"), "<|eot_id|>", ("", "")),
    "mistral": (template_tokenizer_kwargs("mistral"), "</s>", (" ", " ")),
    "gemma": (template_tokenizer_kwargs("gemma"), "<end_of_turn>", ("", "")),
    "phi_3": (template_tokenizer_kwargs("phi3"), "<|end|>", ("", "")),
    "qwen": (template_tokenizer_kwargs("qwen_tools"), "<|im_end|>", ("", "")),
    "cohere": (
        family_tokens(
            "<BOS_TOKEN>",
            "<|END_OF_TURN_TOKEN|>",
            "<|START_OF_TURN_TOKEN|>",
            "<|SYSTEM_TOKEN|>",
            "<|USER_TOKEN|>",
            "<|CHATBOT_TOKEN|>",
        ),
        "<|END_OF_TURN_TOKEN|>",
        ("", ""),
    ),
    "deepseek_v2": (DEEPSEEK_TOKENS, "<｜end▁of▁sentence｜>", ("", "")),
    "deepseek_v3": (DEEPSEEK_TOKENS, "<｜end▁of▁sentence｜>", ("", "")),
    "falcon_h1": (
        family_tokens("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        ("", ""),
    ),
    "gemma3": (template_tokenizer_kwargs("gemma"), "<end_of_turn>", ("", "")),
    "gemma3n": (template_tokenizer_kwargs("gemma"), "<end_of_turn>", ("", "")),
    "gemma4": (GEMMA4_TOKENS, "<turn|>", ("", "")),
    "gemma4_unified": (GEMMA4_TOKENS, "<turn|>", ("", "")),
    "jamba": (
        family_tokens(
            "<|startoftext|>",
            "<|endoftext|>",
            "<|bom|>",
            "<|eom|>",
            "<|system|>",
            "<|user|>",
            "<|assistant|>",
        ),
        "<|eom|>",
        (" ", " "),
    ),
    "llama4": (
        family_tokens("<|begin_of_text|>", "<|eot|>", "<|header_start|>", "<|header_end|>"),
        "<|eot|>",
        ("", ""),
    ),
    "qwen3": (template_tokenizer_kwargs("qwen3"), "<|im_end|>", ("", "</think>\n\n")),
    "qwen3_5": (template_tokenizer_kwargs("qwen3"), "<|im_end|>", ("", "</think>\n\n")),
    "alpaca": (family_tokens("<s>", "</s>"), "</s>", ("", "")),
    "aya": (
        family_tokens("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", *COHERE_TURN),
        "<|END_OF_TURN_TOKEN|>",
        ("", ""),
    ),
    "exaone": (EXAONE_TOKENS, "[|endofturn|]", ("", "")),
    "exaone4": (EXAONE_TOKENS, "[|endofturn|]", ("", "")),
    "mistral_v1": (MISTRAL_TOKENS, "</s>", (" ", " ")),
    "mistral_v2v3": (MISTRAL_TOKENS, "</s>", (" ", " ")),
    "mistral_v3_tekken": (MISTRAL_TOKENS, "</s>", ("", "")),
    "mistral_v7_tekken": (
        family_tokens("<s>", "</s>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"),
        "</s>",
        ("", ""),
    ),
    "nemotron_h": (family_tokens(None, "<|im_end|>", "<|im_start|>"), "<|im_end|>", ("", "")),
    "phi_35": (
        family_tokens(None, "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        "<|end|>",
        ("", ""),
    ),
    "phi_4": (
        family_tokens(None, "<|im_end|>", "<|im_start|>", "<|im_sep|>"),
        "<|im_end|>",
        ("", ""),
    ),
    "qwen_25": (family_tokens(None, "<|im_end|>", "<|im_start|>"), "<|im_end|>", ("", "")),
}


@pytest.mark.parametrize("name", [name for name in BUILTIN_TEMPLATES if name != "metharme"])
@pytest.mark.parametrize("policy", ["turn", "none"])
def test_builtin_templates_train_each_answer_and_its_end_marker(plugins, name, policy):
    """Every built-in template, chosen by name, on its model family's tokenizer: the answers are
    trained, each with the template's end-of-turn marker (under `turn`), and nothing else."""
    kwargs, marker, (earlier, last) = BUILTIN_FAMILIES[name]
    tokenizer = build_tokenizer(**kwargs)
    assert len(tokenizer(marker, add_special_tokens=False)["input_ids"]) == 1
    end = marker if policy == "turn" else ""
    for messages in ([SYSTEM, *TURNS], TURNS[:2]):
        answers = [m["content"] for m in messages if m["role"] == "assistant"]
        leads = [earlier] * (len(answers) - 1) + [last]
        ids, labels = labels_for(tokenizer, messages, chat_template=name, train_on_eos=policy)
        expected = [lead + answer + end for lead, answer in zip(leads, answers, strict=True)]
        assert runs(tokenizer, ids, labels) == expected


def test_a_template_ending_only_the_conversation_trains_that_end_after_the_last_answer(plugins):
    # Metharme writes eos once, after the last message, and nothing between turns: the earlier
    # answers have no end marker to train, the last one ends with eos.
    tokenizer = build_tokenizer(
        **family_tokens("<s>", "</s>", "<|system|>", "<|user|>", "<|model|>")
    )
    ids, labels = labels_for(tokenizer, [SYSTEM, *TURNS], chat_template="metharme")
    assert runs(tokenizer, ids, labels) == ["Paris.", "Tokyo, of course.</s>"]
    ids, labels = labels_for(
        tokenizer, [SYSTEM, *TURNS], chat_template="metharme", train_on_eos="none"
    )
    assert runs(tokenizer, ids, labels) == ["Paris.", "Tokyo, of course."]


# -- reasoning ------------------------------------------------------------------------------

QUESTION_1 = {"role": "user", "content": "What is 2 + 3?"}
QUESTION_2 = {"role": "user", "content": "And times 4?"}


def answer(reasoning: str, text: str, form: str) -> dict[str, Any]:
    if form == "field":
        return {"role": "assistant", "content": text, "reasoning_content": reasoning}
    return {"role": "assistant", "content": f"<think>\n{reasoning}\n</think>\n\n{text}"}


def reasoning_conversations(form: str) -> dict[str, list[dict[str, Any]]]:
    first = answer("First, 2 + 3 = 5.", "It is 5.", form)
    second = answer("Then, 5 * 4 = 20.", "It is 20.", form)
    return {
        "single turn": [QUESTION_1, first],
        "two turns": [QUESTION_1, first, QUESTION_2, second],
        "system, two turns": [SYSTEM, QUESTION_1, first, QUESTION_2, second],
        "two answers after the last question": [QUESTION_1, first, second],
        "no reasoning": [QUESTION_1, {"role": "assistant", "content": "It is 5."}],
    }


REASONING_CASES = [
    (template, form, case)
    for template in ("qwen3", "deepseek_r1")
    for form in ("field", "think tags")
    for case in reasoning_conversations(form)
]


@pytest.mark.parametrize(("template", "form", "case"), REASONING_CASES)
@pytest.mark.parametrize("policy", ["turn", "none"])
def test_reasoning_labels_match_the_generation_spans(plugins, template, form, case, policy):
    tokenizer = tokenizer_for(template, template)
    messages = reasoning_conversations(form)[case]
    text, spans = generation_spans(tokenizer, messages)
    ids, labels = labels_for(tokenizer, messages, train_on_eos=policy)
    expected = expected_labels(tokenizer, text, spans, TEMPLATE_END_OF_TURN[template], policy)
    assert labels == expected, (
        f"ours:     {runs(tokenizer, ids, labels)}\nexpected: {runs(tokenizer, ids, expected)}"
    )


def test_qwen3_trains_reasoning_only_where_the_template_keeps_it(plugins):
    tokenizer = tokenizer_for("qwen3", "qwen3")
    messages = reasoning_conversations("think tags")["two turns"]
    ids, labels = labels_for(tokenizer, messages)
    assert runs(tokenizer, ids, labels) == [
        "It is 5.<|im_end|>",  # an earlier turn: the template drops its reasoning
        "<think>\nThen, 5 * 4 = 20.\n</think>\n\nIt is 20.<|im_end|>",
    ]


def test_train_on_reasoning_false_masks_the_think_block(plugins):
    tokenizer = tokenizer_for("qwen3", "qwen3")
    messages = reasoning_conversations("field")["two answers after the last question"]
    ids, labels = labels_for(tokenizer, messages, train_on_reasoning=False)
    assert runs(tokenizer, ids, labels) == ["It is 5.<|im_end|>", "It is 20.<|im_end|>"]


def test_reasoning_the_template_drops_is_counted_not_refused(plugins):
    tokenizer = tokenizer_for("deepseek_r1", "deepseek_r1")
    render = renderer(tokenizer)
    rendered = render({"messages": reasoning_conversations("think tags")["two turns"]})
    assert rendered.notes == ("trained turns whose reasoning the template drops",) * 2
    assert "First, 2 + 3" not in rendered.text


# -- tool calls -------------------------------------------------------------------------------

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


def tool_row(arguments: Any) -> dict[str, Any]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    return {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "It is 21 °C in Paris."},
        ],
        "tools": TOOLS,
    }


def test_openai_string_arguments_are_parsed_not_double_encoded(plugins):
    tokenizer = tokenizer_for("qwen_tools", "qwen_tools")
    render = renderer(tokenizer)
    as_string = render(tool_row('{"city": "Paris"}'))
    as_object = render(tool_row({"city": "Paris"}))
    assert '"arguments": {"city": "Paris"}' in as_string.text
    assert as_string.text == as_object.text and as_string.spans == as_object.spans


def test_invalid_argument_json_is_a_row_error_naming_the_message(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("qwen_tools", "qwen_tools")
    write_jsonl(tmp_path / "t.jsonl", [tool_row('{"city": Paris'), tool_row({"city": "Rome"})])
    config = make_config('[[datasets]]\npath = "{tmp}/t.jsonl"\ntype = "chat_template"\n')
    with pytest.raises(DataError) as error:
        prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    assert error.value.row == 1
    assert error.value.field == "messages[1].tool_calls[0].function.arguments"
    assert "not valid JSON" in str(error.value)
    skipped = make_config(
        'invalid_rows = "skip"\n[[datasets]]\npath = "{tmp}/t.jsonl"\ntype = "chat_template"\n'
    )
    prepared = prepare_datasets(skipped, tokenizer, show_progress=False, use_cache=False)
    assert prepared.summary.datasets[0].dropped == {"invalid tool call": 1}


def test_argument_shapes_differ_across_rows(plugins, make_config, tmp_path):
    """Rows read from JSON keep their own argument keys (no struct unification adding nulls)."""
    tokenizer = tokenizer_for("qwen_tools", "qwen_tools")
    rows = [tool_row({"city": "Paris"}), tool_row({"query": "weather", "limit": 5})]
    write_jsonl(tmp_path / "t.jsonl", rows)
    config = make_config(
        'shuffle_merged_datasets = false\n[[datasets]]\npath = "{tmp}/t.jsonl"\ntype = "chat_template"\n'
    )
    prepared = prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    texts = [tokenizer.decode(r["input_ids"]) for r in prepared.train]
    assert '"arguments": {"city": "Paris"}}' in texts[0]
    assert '"arguments": {"query": "weather", "limit": 5}}' in texts[1]
    assert "null" not in texts[0] + texts[1]


# -- field mappings ---------------------------------------------------------------------------

SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
    {"conversations": [{"from": "human", "value": "Bye"}, {"from": "gpt", "value": "See you."}]},
]
SHAREGPT_KEYS = (
    'field_messages = "conversations"\nroles = {user = ["human"], assistant = ["gpt"]}\n'
)


def test_a_mapping_that_matches_no_row_is_a_config_error(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("chatml", "chatml")
    write_jsonl(tmp_path / "s.jsonl", SHAREGPT)
    for policy in ("raise", "skip"):
        config = make_config(
            f'invalid_rows = "{policy}"\n[[datasets]]\npath = "{{tmp}}/s.jsonl"\n'
            f'type = "chat_template"\n{SHAREGPT_KEYS}'
            'message_property_mappings = {role = "from", content = "text"}\n'
        )
        with pytest.raises(ConfigError) as error:
            prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
        (problem,) = error.value.problems
        assert problem.path == "datasets[0].message_property_mappings"
        assert "'text'" in problem.message and "from, value" in problem.message


def test_a_row_missing_the_mapped_field_is_a_row_error(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("chatml", "chatml")
    rows = [
        SHAREGPT[0],
        {"conversations": [{"from": "human", "text": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ]
    write_jsonl(tmp_path / "s.jsonl", rows)
    keys = f'{SHAREGPT_KEYS}message_property_mappings = {{role = "from", content = "value"}}\n'
    config = make_config(f'[[datasets]]\npath = "{{tmp}}/s.jsonl"\ntype = "chat_template"\n{keys}')
    with pytest.raises(DataError) as error:
        prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    assert error.value.row == 2 and error.value.field == "conversations[0].value"
    skipping = make_config(
        f'invalid_rows = "skip"\n[[datasets]]\npath = "{{tmp}}/s.jsonl"\ntype = "chat_template"\n{keys}'
    )
    prepared = prepare_datasets(skipping, tokenizer, show_progress=False, use_cache=False)
    assert prepared.summary.datasets[0].dropped == {"missing field": 1}
    assert len(prepared.train) == 1


def test_a_tool_call_message_needs_no_content(plugins):
    tokenizer = tokenizer_for("qwen_tools", "qwen_tools")
    row = tool_row({"city": "Paris"})
    del row["messages"][1]["content"]
    assert "<tool_call>" in renderer(tokenizer)(row).text


# -- one refused row does not hide the others ----------------------------------------------------


def test_the_error_counts_every_failing_row_and_shows_the_first(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("chatml", "chatml")
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
    bad_role = {"messages": [{"role": "bot", "content": "Hi"}]}
    bad_content = {"messages": [{"role": "user", "content": 5}]}
    rows = [good, bad_role, good, bad_content] + [bad_role] * 10 + [good]
    write_jsonl(tmp_path / "t.jsonl", rows)
    config = make_config('[[datasets]]\npath = "{tmp}/t.jsonl"\ntype = "chat_template"\n')
    with pytest.raises(DataError) as error:
        prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    message = str(error.value)
    assert "12 of 15 rows cannot be prepared" in message
    assert "row 2, field 'messages[0].role': unknown role: " in message
    assert "row 4, field 'messages[0].content': wrong type: " in message
    assert "... and 7 more" in message
    assert error.value.row == 2


# -- template errors ------------------------------------------------------------------------------


def test_a_jinja_syntax_error_is_a_config_error_at_validate(plugins, make_config, tmp_path):
    broken = "{% for m in messages %}{{ m.content }"
    (tmp_path / "broken.jinja").write_text("line one\n" + broken)
    for value in (broken, f"{tmp_path}/broken.jinja"):
        with pytest.raises(ConfigError) as error:
            make_config(
                f'chat_template = "jinja"\nchat_template_jinja = {json.dumps(value)}\n'
                '[[datasets]]\npath = "x.jsonl"\ntype = "chat_template"\n'
            )
        (problem,) = [p for p in error.value.problems if p.path == "chat_template_jinja"]
        assert "not valid Jinja" in problem.message and "line" in problem.message


def test_a_template_error_on_every_row_blames_the_template(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("mistral", "mistral")
    rows = [{"messages": [SYSTEM, {"role": "assistant", "content": f"A{i}"}]} for i in range(3)]
    write_jsonl(tmp_path / "t.jsonl", rows)
    config = make_config('[[datasets]]\npath = "{tmp}/t.jsonl"\ntype = "chat_template"\n')
    with pytest.raises(ConfigError) as error:
        prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].chat_template"
    assert "every row" in problem.message and "alternate" in problem.message


def test_eot_tokens_choose_which_part_of_the_trailer_is_trained(plugins):
    template = (
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|><|endoftext|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    )
    tokenizer = build_tokenizer(chat_template=template, **template_tokenizer_kwargs("phi3"))
    ids, labels = labels_for(tokenizer, TURNS[:2])
    assert runs(tokenizer, ids, labels) == ["Paris.<|end|><|endoftext|>"]
    ids, labels = labels_for(tokenizer, TURNS[:2], eot_tokens=["<|end|>"])
    assert runs(tokenizer, ids, labels) == ["Paris.<|end|>"]
    with pytest.raises(ConfigError, match="none of \\['<\\|eot_id\\|>'\\] ends an assistant turn"):
        labels_for(tokenizer, TURNS[:2], eot_tokens=["<|eot_id|>"])


# -- random conversations ---------------------------------------------------------------------

WORDS = ["Paris", "is", "the", "capital", "of", "France.", "Yes!", "42", "ok", "👋", "日本"]
ALTERNATING = {"mistral", "gemma"}


def random_conversation(rng: Any, template: str) -> list[dict[str, Any]]:
    def text() -> str:
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(0, 6)))
        return rng.choice(["", " ", "\n"]) + words if rng.random() < 0.2 else words

    messages: list[dict[str, Any]] = []
    if rng.random() < 0.4 and template != "mistral":
        messages.append({"role": "system", "content": text() or "Be brief."})
    for _ in range(rng.randrange(1, 4)):
        messages.append({"role": "user", "content": text() or "Hi"})
        reply: dict[str, Any] = {"role": "assistant", "content": text()}
        if template in ("qwen3", "deepseek_r1") and rng.random() < 0.5:
            if rng.random() < 0.5:
                reply["reasoning_content"] = text() or "Think."
            else:
                reply["content"] = f"<think>\n{text() or 'Think.'}\n</think>\n\n{reply['content']}"
        messages.append(reply)
        if template not in ALTERNATING and rng.random() < 0.2:
            messages.append({"role": "assistant", "content": text()})
    return messages


RANDOM_PAIRS = [(stem, stem) for stem in sorted(TEMPLATE_END_OF_TURN) if stem != "qwen_tools"]
RANDOM_PAIRS += FOREIGN


@pytest.mark.parametrize(("template", "family"), RANDOM_PAIRS)
def test_random_conversations_match_the_generation_spans(plugins, template, family):
    import random

    rng = random.Random(f"{template}/{family}")
    tokenizer = tokenizer_for(template, family)
    marker = TEMPLATE_END_OF_TURN[template]
    for _ in range(25):
        messages = random_conversation(rng, template)
        text, spans = generation_spans(tokenizer, messages)
        for policy in ("turn", "none"):
            expected = expected_labels(tokenizer, text, spans, marker, policy)
            if all(label == IGNORE_INDEX for label in expected):
                continue  # nothing to train: the row is dropped (tested elsewhere)
            ids, labels = labels_for(tokenizer, messages, train_on_eos=policy)
            assert labels == expected, (
                f"{messages}\nours:     {runs(tokenizer, ids, labels)}\n"
                f"expected: {runs(tokenizer, ids, expected)}"
            )


def test_the_run_summary_tells_when_the_template_drops_reasoning(plugins, make_config, tmp_path):
    tokenizer = tokenizer_for("deepseek_r1", "deepseek_r1")
    rows = [{"messages": reasoning_conversations("field")["two turns"]}] * 2
    write_jsonl(tmp_path / "r.jsonl", rows)
    config = make_config('[[datasets]]\npath = "{tmp}/r.jsonl"\ntype = "chat_template"\n')
    prepared = prepare_datasets(config, tokenizer, show_progress=False, use_cache=False)
    note = f"note: {tmp_path / 'r.jsonl'}: trained turns whose reasoning the template drops: 4"
    assert note in prepared.summary.dropped_lines()  # what `sft run` prints under `data:`
    assert note in prepared.summary.lines()  # and `sft preprocess`


def test_labels_that_would_cut_a_special_token_are_a_row_error_naming_it(plugins):
    # A template that writes the next assistant header after every conversation (as Cohere's
    # Command-A templates do): the end of a turn and the start of the next share
    # "<|START_OF_TURN_TOKEN|><|", so a text-only layout ends the closer inside a special token.
    # Guessing would train part of the next turn's header; the row is refused instead.
    template = (
        "{% for m in messages %}<|START_OF_TURN_TOKEN|>"
        "{{ '<|USER_TOKEN|>' if m['role'] == 'user' else '<|CHATBOT_TOKEN|>' }}"
        "{{ m['content'] }}<|END_OF_TURN_TOKEN|>{% endfor %}"
        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"
    )
    tokenizer = build_tokenizer(
        **family_tokens(None, "<|END_OF_TURN_TOKEN|>", *COHERE_TURN), chat_template=template
    )
    opts = TokenizeOptions(
        sequence_len=4096,
        excess_length_strategy="raise",
        invalid_rows="raise",
        train_on_inputs=False,
    )
    result = process_chunk([{"messages": TURNS}], 0, renderer(tokenizer), tokenizer, opts)
    assert result.input_ids == []
    (problem,) = result.errors
    assert problem.reason == "labels cut a special token"
    assert "inside the special token '<|USER_TOKEN|>'" in problem.message


def test_cut_special_token_ignores_ordinary_tokens_and_absorbed_whitespace():
    from sft.data.tokenize import _offsets_lookup, cut_special_token

    text = "ab<X> cd"
    ids = [1, 2, 99, 3]  # 99: the special token "<X> " (absorbing the space after it)
    offsets = [(0, 1), (1, 2), (2, 6), (6, 8)]
    lookups = _offsets_lookup(offsets)
    special = frozenset({99})
    assert cut_special_token(text, ids, *lookups, [(0, 1)], special) is None  # ordinary token
    assert cut_special_token(text, ids, *lookups, [(5, 8)], special) is None  # at the space
    assert cut_special_token(text, ids, *lookups, [(2, 5)], special) is None  # the whole marker
    assert cut_special_token(text, ids, *lookups, [(0, 4)], special) == (2, 5)
    assert cut_special_token(text, ids, *lookups, [(3, 8)], special) == (2, 5)
