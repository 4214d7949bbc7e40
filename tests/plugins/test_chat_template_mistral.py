"""tokenizer_use_mistral_common: conversations encoded by mistral-common, labels found on the ids.

The tokenizer files are the ones mistral-common ships (`mistral_common/data/tekken_240911.json`,
a v3 Tekken tokenizer: the system prompt goes before the *last* user turn) and the same
vocabulary declared v13 with its special tokens listed (system prompt in its own tokens at the
start, reasoning as [THINK] chunks).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import write_jsonl

pytest.importorskip("mistral_common", reason="mistral-common is not installed (extra: mistral)")

from sft.data.pipeline import prepare_datasets
from sft.errors import ConfigError

IGNORE = -100
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> dict[str, Path]:
    import mistral_common
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    shipped = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
    root = tmp_path_factory.mktemp("mistral")
    (root / "v3").mkdir()
    (root / "v3" / "tekken.json").write_bytes(shipped.read_bytes())
    data = json.loads(shipped.read_text())
    specials = [dict(s) for s in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
    for offset, token in enumerate(["[THINK]", "[/THINK]", "[ARGS]", "[CALL_ID]"]):
        specials.append({"rank": len(Tekkenizer.DEPRECATED_SPECIAL_TOKENS) + offset,
                         "token_str": token, "is_control": True})  # fmt: skip
    data["config"]["version"] = "v13"
    data["special_tokens"] = [{**s, "token_str": str(s["token_str"])} for s in specials]
    (root / "v13").mkdir()
    (root / "v13" / "tekken.json").write_text(json.dumps(data))
    return {"v3": root / "v3", "v13": root / "v13"}


LOADED: dict[Path, object] = {}  # a Tekken file is tens of MB of JSON: load each once


def prepare(make_config, directory: Path, rows: list, extra: str = ""):
    write_jsonl(make_config.tmp_path / "chat.jsonl", rows)
    config = make_config(
        f'tokenizer_config = "{directory}"\ntokenizer_use_mistral_common = true\n'
        f'shuffle_merged_datasets = false\n[[datasets]]\npath = "{{tmp}}/chat.jsonl"\n'
        f'type = "chat_template"\n{extra}'
    )
    from sft.tokenizer import load_tokenizer

    if directory not in LOADED:
        LOADED[directory] = load_tokenizer(config)
    tokenizer = LOADED[directory]
    return tokenizer, prepare_datasets(config, tokenizer, show_progress=False).train


def trained_pieces(tokenizer, row) -> list[str]:
    """The trained stretches of a row, each decoded with its special tokens."""
    pieces, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            pieces.append(current)
            current = []
    if current:
        pieces.append(current)
    return [tokenizer.decode(p, skip_special_tokens=False) for p in pieces]


def test_v3_system_prompt_at_the_last_user_turn_labels_each_answer(make_config, tokenizer_dirs):
    tokenizer, (row,) = prepare(make_config, tokenizer_dirs["v3"], [{"messages": CHAT}])
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    # v3 moves the system prompt to the last user turn: the first turn's own encoding is not a
    # prefix of the whole conversation, and its labels are still exact
    assert text == "<s>[INST]Hi[/INST]Hello!</s>[INST]Be brief.\n\n2+2?[/INST]4</s>"
    assert trained_pieces(tokenizer, row) == ["Hello!</s>", "4</s>"]


def test_v13_reasoning_is_trained_with_its_answer(make_config, tokenizer_dirs):
    chat = [dict(m) for m in CHAT]
    chat[2]["reasoning_content"] = "hmm"
    tokenizer, (row,) = prepare(make_config, tokenizer_dirs["v13"], [{"messages": chat}])
    text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert text.startswith("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]Hi[/INST]")
    assert trained_pieces(tokenizer, row) == ["[THINK]hmm[/THINK]Hello!</s>", "4</s>"]


def test_content_chunks_are_passed_to_mistral_common(make_config, tokenizer_dirs):
    chat = [dict(m) for m in CHAT]
    chat[2]["content"] = [
        {"type": "thinking", "thinking": "hmm"},
        {"type": "text", "text": "Hello!"},
    ]
    tokenizer, (row,) = prepare(make_config, tokenizer_dirs["v13"], [{"messages": chat}])
    assert trained_pieces(tokenizer, row) == ["[THINK]hmm[/THINK]Hello!</s>", "4</s>"]


@pytest.mark.parametrize(
    "policy, expected",
    [("none", ["Hello!", "4"]), ("last", ["Hello!", "4</s>"]), ("all", ["Hello!</s>", "4</s>"])],
)
def test_train_on_eos(make_config, tokenizer_dirs, policy, expected):
    tokenizer, (row,) = prepare(
        make_config, tokenizer_dirs["v3"], [{"messages": CHAT}], f'train_on_eos = "{policy}"\n'
    )
    assert trained_pieces(tokenizer, row) == expected


def test_per_message_training_and_a_trailing_user_turn(make_config, tokenizer_dirs):
    chat = [dict(m) for m in CHAT] + [{"role": "user", "content": "Thanks"}]
    chat[2]["train"] = False
    tokenizer, (row,) = prepare(
        make_config,
        tokenizer_dirs["v3"],
        [{"messages": chat}],
        'message_field_training = "train"\n',
    )
    assert trained_pieces(tokenizer, row) == ["4</s>"]
    # the user turn after the last answer trains nothing and is left out
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=False).endswith("4</s>")


def test_a_row_mistral_common_refuses_is_a_row_error(make_config, tokenizer_dirs):
    from sft.errors import DataError

    rows = [{"messages": CHAT}, {"messages": [CHAT[1], CHAT[2], CHAT[2]]}]
    with pytest.raises(DataError, match="mistral-common cannot encode this conversation"):
        prepare(make_config, tokenizer_dirs["v3"], rows)


def problems_of(make_config, text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as caught:
        make_config("tokenizer_use_mistral_common = true\n" + text)
    return {p.path: p.message for p in caught.value.problems}


def test_what_a_mistral_common_tokenizer_cannot_do_is_refused_with_the_config(make_config):
    problems = problems_of(
        make_config,
        'chat_template = "chatml"\ntokens = ["<x>"]\n'
        '[[datasets]]\npath = "a.jsonl"\ntype = "chat_template"\nroles_to_train = ["user"]\n'
        '[[datasets]]\npath = "b.jsonl"\ntype = "alpaca"\n',
    )
    assert problems["chat_template"].startswith("has no effect with tokenizer_use_mistral_common")
    assert "fixed vocabulary" in problems["tokens"]
    assert "only assistant turns" in problems["datasets[0].roles_to_train"]
    assert "cannot map tokens back to text" in problems["datasets[1].type"]


def test_a_missing_mistral_common_package_says_how_to_install_it(
    make_config, tokenizer_dirs, monkeypatch
):
    import importlib.util

    from sft.errors import ModelError
    from sft.tokenizer import load_tokenizer

    config = make_config(
        f'tokenizer_config = "{tokenizer_dirs["v3"]}"\ntokenizer_use_mistral_common = true\n'
        '[[datasets]]\npath = "a.jsonl"\ntype = "chat_template"\n',
        machine_checks=False,
    )
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "mistral_common" else find_spec(name, *args),
    )
    with pytest.raises(ModelError, match=r"pip install 'sft-train\[mistral\]'"):
        load_tokenizer(config)


def test_training_with_a_mistral_common_tokenizer(tiny_project, tokenizer_dirs):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sft.train.run import train

    model_dir = tiny_project.tmp_path / "mistral-tiny"
    config = LlamaConfig(
        vocab_size=131072,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=11,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    (model_dir / "tekken.json").write_bytes((tokenizer_dirs["v3"] / "tekken.json").read_bytes())
    result = train(
        tiny_project(
            f"base_model={model_dir}",
            "tokenizer_use_mistral_common=true",
            "chat_template=tokenizer_default",
            "max_steps=2",
            "adapter=lora",
        )
    )
    assert result.global_step == 2
    assert (result.output_dir / "tekken.json").is_file()  # the tokenizer saved beside the adapter
    # `sft chat` reads the run's config: the adapter answers through mistral-common
    from sft.inference import load_trained, locate, reply

    model, tokenizer = load_trained(locate(result.output_dir))
    assert type(tokenizer).__name__ == "MistralCommonBackend"
    reply(model, tokenizer, [{"role": "user", "content": "Hi"}], max_new_tokens=2)
