"""chat_template options: ShareGPT mapping, per-message training, tools, template selection, errors."""

from __future__ import annotations

import json

import pytest
from conftest import write_jsonl

from sft.data.pipeline import prepare_datasets
from sft.errors import ConfigError, DataError
from sft.plugins.chat_template.templates import BUILTIN_TEMPLATES, builtin_template
from sft.testing import build_tokenizer, template_tokenizer_kwargs

IGNORE = -100
CHATML_TOKENS = {"special_tokens": ["<|im_start|>", "<|im_end|>"], "eos_token": "<|im_end|>"}


@pytest.fixture(scope="module")
def chatml_tokenizer():
    return build_tokenizer(chat_template=builtin_template("chatml"), **CHATML_TOKENS)


def runs(tokenizer, ids, labels):
    out, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE:
            current.append(token)
        elif current:
            out.append(tokenizer.decode(current))
            current = []
    if current:
        out.append(tokenizer.decode(current))
    return out


def prepare(make_config, tokenizer, dataset_keys: str, rows, root: str = ""):
    write_jsonl(make_config.tmp_path / "d.jsonl", rows)
    text = (
        root
        + '\nshuffle_merged_datasets = false\n[[datasets]]\npath = "{tmp}/d.jsonl"\ntype = "chat_template"\n'
        + dataset_keys
    )
    return prepare_datasets(make_config(text), tokenizer, show_progress=False)


SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be kind."},
        {"from": "human", "value": "Hi there"},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "Bye"},
        {"from": "gpt", "value": "Goodbye."},
    ]
}


def test_sharegpt_by_config_alone(make_config, chatml_tokenizer):
    keys = (
        'field_messages = "conversations"\n'
        'message_property_mappings = { role = "from", content = "value" }\n'
        'roles = { user = ["human"], assistant = ["gpt"], system = ["system"] }\n'
    )
    (row,) = prepare(make_config, chatml_tokenizer, keys, [SHAREGPT]).train
    assert runs(chatml_tokenizer, row["input_ids"], row["labels"]) == [
        "Hello!<|im_end|>",
        "Goodbye.<|im_end|>",
    ]


def test_default_roles_map_human_and_gpt(make_config, chatml_tokenizer):
    keys = 'field_messages = "conversations"\nmessage_property_mappings = { role = "from", content = "value" }\n'
    (row,) = prepare(make_config, chatml_tokenizer, keys, [SHAREGPT]).train
    assert runs(chatml_tokenizer, row["input_ids"], row["labels"]) == [
        "Hello!<|im_end|>",
        "Goodbye.<|im_end|>",
    ]


def test_message_field_training_overrides_roles(make_config, chatml_tokenizer):
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "bad answer", "train": False},
        {"role": "user", "content": "Q2", "train": True},
        {"role": "assistant", "content": "good answer"},
    ]
    keys = 'message_field_training = "train"\n'
    (row,) = prepare(make_config, chatml_tokenizer, keys, [{"messages": messages}]).train
    assert runs(chatml_tokenizer, row["input_ids"], row["labels"]) == [
        "Q2<|im_end|>",
        "good answer<|im_end|>",
    ]


def test_drop_system_message_and_default_system_message(make_config, chatml_tokenizer):
    messages = [
        {"role": "system", "content": "SECRET"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    (row,) = prepare(
        make_config, chatml_tokenizer, "drop_system_message = true\n", [{"messages": messages}]
    ).train
    assert "SECRET" not in chatml_tokenizer.decode(row["input_ids"])
    (row,) = prepare(
        make_config,
        chatml_tokenizer,
        "",
        [{"messages": messages[1:]}],
        root='default_system_message = "Be brief."',
    ).train
    assert chatml_tokenizer.decode(row["input_ids"]).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>"
    )


def test_tools_field_as_json_string_reaches_the_template(make_config):
    tokenizer = build_tokenizer(
        chat_template=builtin_template("qwen"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        bos_token=None,
    )
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    row = {
        "messages": [
            {"role": "user", "content": "Find it"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "lookup", "arguments": {"q": "x"}}}],
            },
            {"role": "tool", "content": "found"},
            {"role": "assistant", "content": "Here it is."},
        ],
        "functions": json.dumps(tools),
    }
    (sample,) = prepare(make_config, tokenizer, 'field_tools = "functions"\n', [row]).train
    text = tokenizer.decode(sample["input_ids"])
    assert '"name": "lookup"' in text.split("# Tools")[1].split("<|im_end|>")[0]
    trained = runs(tokenizer, sample["input_ids"], sample["labels"])
    assert trained[0].startswith('<tool_call>\n{"name": "lookup"') and trained[0].endswith(
        "<|im_end|>"
    )
    assert trained[1] == "Here it is.<|im_end|>"
    assert not any("found" in piece for piece in trained)


def test_glaive_style_function_call_and_observation_roles(make_config):
    tokenizer = build_tokenizer(
        chat_template=builtin_template("qwen"),
        special_tokens=["<|im_start|>", "<|im_end|>"],
        eos_token="<|im_end|>",
        bos_token=None,
    )
    row = {
        "conversations": [
            {"from": "human", "value": "Weather?"},
            {"from": "function_call", "value": '{"name": "weather", "arguments": {}}'},
            {"from": "observation", "value": '{"t": 3}'},
            {"from": "gpt", "value": "3 degrees."},
        ],
        "tools": "[]",
    }
    keys = (
        'field_messages = "conversations"\nmessage_property_mappings = { role = "from", content = "value" }\n'
        'roles = { user = ["human"], assistant = ["gpt", "function_call"], tool = ["observation"] }\n'
    )
    (sample,) = prepare(make_config, tokenizer, keys, [row]).train
    assert runs(tokenizer, sample["input_ids"], sample["labels"]) == [
        '{"name": "weather", "arguments": {}}<|im_end|>',
        "3 degrees.<|im_end|>",
    ]


def test_unknown_role_is_a_row_error_or_skipped(make_config, chatml_tokenizer):
    rows = [
        {"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}
    ]
    with pytest.raises(DataError) as error:
        prepare(make_config, chatml_tokenizer, "", rows)
    assert error.value.row == 1 and "unknown role 'narrator'" in str(error.value)
    assert "roles" in str(error.value)
    rows.append(
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    )
    prepared = prepare(make_config, chatml_tokenizer, "", rows, root='invalid_rows = "skip"')
    assert len(prepared.train) == 1 and prepared.summary.datasets[0].dropped == {"unknown role": 1}


def test_bad_rows_are_counted_by_reason(make_config, chatml_tokenizer):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    rows = [
        good,
        {"msgs": []},
        {"messages": "not a list"},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ]
    prepared = prepare(make_config, chatml_tokenizer, "", rows, root='invalid_rows = "skip"')
    assert len(prepared.train) == 1
    assert prepared.summary.datasets[0].dropped == {
        "missing field": 1,
        "wrong type": 2,
        "no trainable tokens": 1,
    }


@pytest.mark.parametrize("name", BUILTIN_TEMPLATES)
def test_builtin_templates_render_and_mask(make_config, name):
    specials = [
        "<|im_start|>",
        "<|im_end|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "[INST]",
        "[/INST]",
        "<start_of_turn>",
        "<end_of_turn>",
        "<|user|>",
        "<|assistant|>",
        "<|system|>",
        "<|end|>",
    ]
    tokenizer = build_tokenizer(special_tokens=specials, eos_token="</s>", bos_token="<s>")
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "The answer."},
    ]
    (row,) = prepare(
        make_config, tokenizer, "", [{"messages": messages}], root=f'chat_template = "{name}"'
    ).train
    trained = runs(tokenizer, row["input_ids"], row["labels"])
    answer = trained[0].strip()
    if name in ("qwen3", "qwen3_5"):  # the generation prompt opens <think>, the answer closes it
        answer = answer.removeprefix("</think>").lstrip()
    assert len(trained) == 1 and answer.startswith("The answer.")
    assert trained[0] != "The answer."  # the end-of-turn token is trained too


def test_jinja_template_inline_and_from_a_file(make_config, tmp_path):
    template = "{% for m in messages %}<<{{ m['role'] }}>>{{ m['content'] }}</s>{% endfor %}"
    tokenizer = build_tokenizer(eos_token="</s>")
    rows = [
        {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A!"}]}
    ]
    inline = prepare(
        make_config,
        tokenizer,
        "",
        rows,
        root=f'chat_template = "jinja"\nchat_template_jinja = "{template}"',
    )
    (tmp_path / "t.jinja").write_text(template.replace('"', "'"))
    from_file = prepare(
        make_config,
        tokenizer,
        "",
        rows,
        root=f'chat_template = "jinja"\nchat_template_jinja = "{tmp_path}/t.jinja"',
    )
    for prepared in (inline, from_file):
        (row,) = prepared.train
        assert runs(tokenizer, row["input_ids"], row["labels"]) == ["A!</s>"]


def test_missing_template_names_the_fix(make_config):
    tokenizer = build_tokenizer(eos_token="</s>")
    rows = [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}]
    with pytest.raises(ConfigError) as error:
        prepare(make_config, tokenizer, "", rows)
    assert "no chat template" in str(error.value) and "chat_template = 'chatml'" in str(error.value)
    fallback = prepare(
        make_config, tokenizer, "", rows, root='chat_template = "tokenizer_default_fallback_chatml"'
    )
    assert len(fallback.train) == 1


@pytest.mark.parametrize(
    ("root", "dataset", "where"),
    [
        ('chat_template = "chatml"\nchat_template_jinja = "{{ x }}"', "", "chat_template_jinja"),
        (
            "",
            'chat_template = "llama3"\nchat_template_jinja = "t.jinja"\n',
            "datasets[0].chat_template_jinja",
        ),
    ],
)
def test_a_jinja_template_beside_another_template_name_is_an_error(
    make_config, root, dataset, where
):
    # Only chat_template = "jinja" reads chat_template_jinja: a template given beside a built-in
    # name would be silently ignored.
    text = root + '\n[[datasets]]\npath = "d.jsonl"\ntype = "chat_template"\n' + dataset
    with pytest.raises(ConfigError) as error:
        make_config(text, machine_checks=False)
    problem = next(p for p in error.value.problems if p.path == where)
    assert "only 'jinja' reads it" in problem.message
    assert "chat_template = 'jinja'" in (problem.hint or "")


def test_chat_template_kwargs_reach_the_template_and_move_the_labels(make_config):
    # Qwen3's template reads enable_thinking: with it false the generation prompt holds an empty
    # think block, so the model's own text (trained) is the answer alone.
    tokenizer = build_tokenizer(**template_tokenizer_kwargs("qwen3"))
    messages = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer."}]
    rows = [{"messages": messages}]
    default = prepare(make_config, tokenizer, "", rows, root='chat_template = "qwen3"')
    no_thinking = prepare(
        make_config,
        tokenizer,
        "",
        rows,
        root='chat_template = "qwen3"\nchat_template_kwargs = {enable_thinking = false}',
    )
    (row,) = default.train
    assert runs(tokenizer, row["input_ids"], row["labels"]) == ["</think>\n\nThe answer.<|im_end|>"]
    (row,) = no_thinking.train
    assert runs(tokenizer, row["input_ids"], row["labels"]) == ["The answer.<|im_end|>"]
    assert "<think>\n\n</think>" in tokenizer.decode(row["input_ids"])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("add_generation_prompt", "set by sft"), ("eos_token", "special_tokens = {eos_token")],
)
def test_chat_template_kwargs_cannot_override_what_the_rendering_sets(make_config, name, expected):
    text = f'chat_template_kwargs = {{{name} = "x"}}\n[[datasets]]\npath = "d.jsonl"\ntype = "chat_template"\n'
    with pytest.raises(ConfigError) as error:
        make_config(text, machine_checks=False)
    (problem,) = [p for p in error.value.problems if p.path == f"chat_template_kwargs.{name}"]
    assert expected in problem.message + (problem.hint or "")


def test_root_chat_template_is_set_on_the_tokenizer(plugins):
    from sft.config import load_config_text

    tokenizer = build_tokenizer(eos_token="</s>")
    config = load_config_text(
        'base_model = "m"\nchat_template = "llama3"\n[[datasets]]\npath = "a"\n'
    )
    plugins.prepare_tokenizer(tokenizer, config)
    assert tokenizer.chat_template == builtin_template("llama3")


def test_a_template_that_rejects_the_conversation_is_a_row_error(make_config):
    tokenizer = build_tokenizer(
        special_tokens=["[INST]", "[/INST]"], eos_token="</s>", bos_token="<s>"
    )
    rows = [
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"},
            ]
        }
    ]
    with pytest.raises(DataError, match="template error"):
        prepare(make_config, tokenizer, "", rows, root='chat_template = "mistral"')
