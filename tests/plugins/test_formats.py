"""alpaca, completion, input_output and pre-tokenized rows: exact labels from the tokens."""

from __future__ import annotations

import pytest
from conftest import write_jsonl

from sft.data.pipeline import prepare_datasets
from sft.errors import DataError

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
        "completes the request.\n\nUSER: Name a colour.\nASSISTANT:"
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
