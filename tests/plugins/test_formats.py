"""alpaca, completion, input_output and pre-tokenized rows: exact labels from the tokens."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from sft.data.pipeline import prepare_datasets
from sft.errors import ConfigError, DataError

IGNORE = -100


def trained_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label != IGNORE])


def masked_text(tokenizer, ids, labels) -> str:
    return tokenizer.decode([i for i, label in zip(ids, labels, strict=True) if label == IGNORE])


def prepare(make_config, tokenizer, text, *overrides):
    config = make_config("shuffle_merged_datasets = false\n" + text, *overrides)
    return prepare_datasets(config, tokenizer, show_progress=False)


def test_alpaca_trains_exactly_the_output_and_eos(make_config, tokenizer, tmp_path):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        ],
    )
    prepared = prepare(
        make_config, tokenizer, '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "alpaca"\n'
    )
    first, second = prepared.train
    assert first["input_ids"][0] == tokenizer.bos_token_id  # the tokenizer's BOS, not trained
    assert trained_text(tokenizer, first["input_ids"], first["labels"]) == "Blue.</s>"
    assert masked_text(tokenizer, first["input_ids"], first["labels"]).endswith(
        "### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert "### Input:\n2 and 3" in masked_text(tokenizer, second["input_ids"], second["labels"])
    assert trained_text(tokenizer, second["input_ids"], second["labels"]) == "5</s>"


@pytest.mark.parametrize("kind", ["alpaca:chat", "alpaca_chat"])
def test_alpaca_chat_style_is_axolotls_user_assistant_prompt(
    make_config, tokenizer, tmp_path, kind
):
    write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Name a colour.", "input": "", "output": " Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": " 5"},
        ],
    )
    first, second = prepare(
        make_config, tokenizer, f'[[datasets]]\npath = "{{tmp}}/a.jsonl"\ntype = "{kind}"\n'
    ).train
    assert masked_text(tokenizer, first["input_ids"], first["labels"]).endswith(
        "SYSTEM: Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.\nUSER: Name a colour.\nASSISTANT:"
    )
    assert masked_text(tokenizer, second["input_ids"], second["labels"]).endswith(
        "USER: Add the numbers.\n2 and 3\nASSISTANT:"
    )
    assert trained_text(tokenizer, first["input_ids"], first["labels"]) == " Blue.</s>"
    assert trained_text(tokenizer, second["input_ids"], second["labels"]) == " 5</s>"
    # the row's own format keys still win over the style's
    (row, _) = prepare(
        make_config,
        tokenizer,
        f'[[datasets]]\npath = "{{tmp}}/a.jsonl"\ntype = "{kind}"\n'
        'no_input_format = "Q: {instruction}\\nA:"\n',
    ).train
    assert masked_text(tokenizer, row["input_ids"], row["labels"]).endswith("Q: Name a colour.\nA:")


NO_INPUT_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
WITH_INPUT_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)

# Axolotl 0.19's prompters (axolotl.prompters + the field parsing of prompt_tokenizers) on each
# row: the prompt (masked) and the response (trained, then EOS), copied from running them.
INSTRUCTION_TYPES = [
    (
        "alpaca:chatml",
        {"instruction": "Do X.", "output": "Y"},
        f"<|im_start|>system\n{NO_INPUT_PREAMBLE}<|im_end|>\n<|im_start|>user\nDo X.<|im_end|>\n"
        "<|im_start|>assistant\n",
        "Y",
    ),
    (
        "alpaca:phi",
        {"instruction": "Do X.", "input": "", "output": "Y"},
        f"<|system|>\n{NO_INPUT_PREAMBLE}<|end|>\n<|user|>\nDo X.<|end|>\n<|assistant|>\n",
        "Y",
    ),
    (
        "alpaca:phi",
        {"instruction": "Do X.", "input": "ctx", "output": "Y"},
        f"<|system|>\n{WITH_INPUT_PREAMBLE}<|end|>\n<|user|>\nDo X.<|end|>ctx<|assistant|>",
        "Y",
    ),
    (
        "jeopardy",
        {"question": "Q?", "category": "CAT", "answer": "A"},
        f"{WITH_INPUT_PREAMBLE}\n\n### Instruction:\nQ?\n\n### Input:\nCAT\n\n### Response:\n",
        "what is A",
    ),
    (
        "oasst",
        {"INSTRUCTION": "Hi", "RESPONSE": "Hello"},
        f"{NO_INPUT_PREAMBLE}\n\n### Instruction:\nHi\n\n### Response:\n",
        "Hello",
    ),
    (
        "gpteacher:chat",
        {"instruction": "I", "input": "In", "response": "R"},
        f"SYSTEM: {WITH_INPUT_PREAMBLE}\nUSER: I\nIn\nASSISTANT:",
        "R",
    ),
    (
        "explainchoice",
        {"question": "Q?", "choices": ["a", "b"], "explanation": "because"},
        "Choose the answer that best answers the question. Explain your reasoning.\n\n\n"
        '### Instruction:\nQ?\n\n### Input:\n- "a"\n- "b"\n\n### Response:\n',
        "because",
    ),
    (
        "concisechoice",
        {"question": "Q?", "choices": ["a", "b"], "solution": "a"},
        "Choose the answer that best answers the question. Be concise in your response.\n\n"
        'USER: Q?\n- "a"\n- "b"\nASSISTANT:',
        "a",
    ),
    (
        "summarizetldr",
        {"article": "Long text.", "summary": "Short."},
        "USER: Summarize the following article as a TL;DR.\nLong text.\nASSISTANT:",
        "Short.",
    ),
]


@pytest.mark.parametrize(("kind", "row", "prompt", "response"), INSTRUCTION_TYPES)
def test_axolotls_instruction_types_write_its_prompts_and_train_the_response(
    make_config, tokenizer, tmp_path, kind, row, prompt, response
):
    write_jsonl(tmp_path / "a.jsonl", [row])
    (sample,) = prepare(
        make_config, tokenizer, f'[[datasets]]\npath = "{{tmp}}/a.jsonl"\ntype = "{kind}"\n'
    ).train
    ids, labels = sample["input_ids"], sample["labels"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == prompt + response + "</s>"
    assert trained_text(tokenizer, ids, labels) == response + "</s>"


def test_alpaca_chat_takes_axolotls_conversation_key_as_its_style(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Do X.", "output": "Y"}])
    text = '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "alpaca_chat"\nconversation = "chatml"\n'
    (sample,) = prepare(make_config, tokenizer, text).train
    assert tokenizer.decode(sample["input_ids"][1:]) == (
        f"<|im_start|>system\n{NO_INPUT_PREAMBLE}<|im_end|>\n<|im_start|>user\nDo X.<|im_end|>\n"
        "<|im_start|>assistant\nY</s>"
    )
    with pytest.raises(ConfigError, match="unknown prompt style 'vicuna' for alpaca_chat"):
        make_config(text.replace("chatml", "vicuna"))


def test_an_instruction_type_names_the_missing_field(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"question": "Q?", "category": "CAT"}])
    with pytest.raises(DataError, match=r"a.jsonl, row 1, field 'answer': missing field"):
        prepare(make_config, tokenizer, '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "jeopardy"\n')


def test_styles_apply_to_bases_with_a_prompt_style_only(plugins):
    names = set(plugins.prompt_strategies().names())
    assert {"alpaca:phi", "alpaca:chatml", "jeopardy:chat", "oasst:instruct"} <= names
    assert "summarizetldr" in names and "summarizetldr:chat" not in names  # one fixed format


def test_alpaca_custom_fields_and_system_prompt(make_config, tokenizer, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "Hi?", "a": "Hello."}])
    prepared = prepare(
        make_config,
        tokenizer,
        '[[datasets]]\npath = "{tmp}/a.jsonl"\ntype = "alpaca"\nfield_instruction = "q"\n'
        'field_output = "a"\nsystem_prompt = "Be brief."\n',
    )
    (row,) = prepared.train
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True).startswith("Be brief.\n\n")
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == "Hello.</s>"


def test_completion_splits_long_texts_into_sequence_len_chunks(make_config, tokenizer, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(300))
    write_jsonl(tmp_path / "c.jsonl", [{"body": long_text}, {"body": "short"}])
    prepared = prepare(
        make_config,
        tokenizer,
        'sequence_len = 64\n[[datasets]]\npath = "{tmp}/c.jsonl"\ntype = "completion"\nfield = "body"\n',
    )
    total = len(tokenizer(long_text + "</s>")["input_ids"])
    lengths = [len(r["input_ids"]) for r in prepared.train]
    assert all(n <= 64 for n in lengths)
    assert sum(lengths) == total + len(tokenizer("short</s>")["input_ids"])  # nothing cut
    rejoined = [i for r in list(prepared.train)[:-1] for i in r["input_ids"]]
    assert tokenizer.decode(rejoined, skip_special_tokens=True) == long_text
    assert all(
        r["labels"] == [x if x != tokenizer.bos_token_id else IGNORE for x in r["input_ids"]]
        for r in prepared.train
    )


def test_input_output_trains_labelled_segments_only(make_config, tokenizer, tmp_path):
    segments = [
        {"text": "Q: what is 2+2?\n", "label": False},
        {"text": "A: 4", "label": True},
        {"text": "\n--\n", "label": False},
        {"text": "Done 👋", "label": True},
    ]
    write_jsonl(tmp_path / "s.jsonl", [{"segments": segments}])
    prepared = prepare(
        make_config, tokenizer, '[[datasets]]\npath = "{tmp}/s.jsonl"\ntype = "input_output"\n'
    )
    (row,) = prepared.train
    assert tokenizer.decode(row["input_ids"]) == "".join(s["text"] for s in segments)  # no BOS/EOS
    assert trained_text(tokenizer, row["input_ids"], row["labels"]) == "A: 4Done 👋"


def test_pretokenized_rows_pass_through_validated(make_config, tokenizer, tmp_path):
    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [0, 5, 6, 9], "attention_mask": [0, 1, 1, 1]},
        {"input_ids": [5, 6], "labels": [5]},
        {"input_ids": [5, 99999]},
    ]
    write_jsonl(tmp_path / "t.jsonl", rows)
    prepared = prepare(
        make_config, tokenizer, 'invalid_rows = "skip"\n[[datasets]]\npath = "{tmp}/t.jsonl"\n'
    )
    assert [r["input_ids"] for r in prepared.train] == [[5, 6, 7, 8], [5, 6, 9]]
    assert [r["labels"] for r in prepared.train] == [[-100, -100, 7, 8], [5, 6, 9]]
    assert prepared.summary.datasets[0].dropped == {"bad token id": 1, "wrong length": 1}
    with pytest.raises(DataError) as error:
        prepare(make_config, tokenizer, '[[datasets]]\npath = "{tmp}/t.jsonl"\n')
    assert error.value.row == 3 and error.value.field == "labels"


def test_alpaca_format_placeholders_are_checked_with_the_config(make_config):
    from sft.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        make_config('[[datasets]]\npath = "a"\ntype = "alpaca"\nsystem_format = "{sys}\\n"\n')
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].system_format" and "{system}" in problem.message


def test_a_strategy_that_crashes_names_the_row(make_config, tokenizer, tmp_path, plugins):
    from sft import hookimpl
    from sft.components import PromptStrategy

    class Fragile:
        @hookimpl
        def sft_register_prompt_strategies(self, register):
            register(
                PromptStrategy("fragile", lambda ds, tok, cfg: lambda row: row["text"].upper() / 2)
            )

    plugins.register(Fragile(), name="fragile")
    write_jsonl(tmp_path / "f.jsonl", [{"text": "a"}])
    with pytest.raises(DataError) as error:
        prepare(make_config, tokenizer, '[[datasets]]\npath = "{tmp}/f.jsonl"\ntype = "fragile"\n')
    assert error.value.row == 1
    assert "prompt strategy 'fragile' (plugin fragile, package unknown) raised TypeError" in str(
        error.value
    )
