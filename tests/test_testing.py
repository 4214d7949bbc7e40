"""Tests for `sft.testing` (tiny tokenizers and models) and the chat template test assets."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sft.testing import (
    MODEL_ARCHS,
    TEMPLATE_END_OF_TURN,
    build_model,
    build_tokenizer,
    template_special_tokens,
    template_tokenizer_kwargs,
)

TEMPLATES = Path(__file__).resolve().parent / "assets" / "chat_templates"
STEMS = sorted(TEMPLATE_END_OF_TURN)

UNICODE_TEXT = "Grüße 👋🏽 — 日本語"
TOOL_CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def template_tokenizer(stem: str) -> Any:
    return build_tokenizer(
        chat_template=(TEMPLATES / f"{stem}.jinja").read_text(), **template_tokenizer_kwargs(stem)
    )


def masked_runs(tokenizer: Any, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded text of each run of consecutive masked tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token_id, flag in zip(ids, mask, strict=True):
        if flag and not previous:
            runs.append([])
        if flag:
            runs[-1].append(token_id)
        previous = flag
    return [tokenizer.decode(run) for run in runs]


# --- tokenizer -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        UNICODE_TEXT,
        "Hello, world! How are you today?",
        TOOL_CALL_JSON,
        "Numbers 3.14159, -42 and 1e10; quotes \"a\" 'b' and tabs\tand\n\nnewlines\n",
        "  leading and trailing spaces  ",
        "def f(x):\n    return {'a': [1, 2]}\n",
        "Ünïcödé ñ ß 中文 한국어 العربية 🚀🔥 \u200b zero-width",
    ],
)
def test_tokenizer_round_trips(text: str) -> None:
    tok = build_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text
    assert tok.decode(tok(text)["input_ids"]) == text


def test_json_tokenizes_compactly() -> None:
    tok = build_tokenizer()
    ids = tok.encode(TOOL_CALL_JSON, add_special_tokens=False)
    assert len(ids) < len(TOOL_CALL_JSON) / 2  # the corpus taught it JSON-ish merges


def test_special_tokens_are_single_ids() -> None:
    specials = ["<|im_start|>", "<|im_end|>", "<tool_call>"]
    tok = build_tokenizer(special_tokens=specials, pad_token="<pad>", unk_token="<unk>")
    for token in [*specials, "<s>", "</s>", "<pad>", "<unk>"]:
        ids = tok.encode(f"a{token}b", add_special_tokens=False)
        assert tok.convert_ids_to_tokens(ids) == ["a", token, "b"]
        assert tok.convert_tokens_to_ids(token) in tok.all_special_ids
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<s>",
        "</s>",
        "<pad>",
        "<unk>",
    )
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>", add_special_tokens=False)) == (
        "<|im_start|>hi<|im_end|>"
    )
    text = "<|im_start|>hi<|im_end|>"
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == "hi"


def test_no_bos_token() -> None:
    tok = build_tokenizer(bos_token=None, eos_token="<|im_end|>")
    assert tok.bos_token is None and tok.bos_token_id is None
    assert tok.encode("hi")[0] != tok.eos_token_id
    with pytest.raises(ValueError, match="bos_token"):
        build_tokenizer(bos_token=None, add_bos=True)


def test_offsets_are_character_offsets() -> None:
    tok = build_tokenizer(special_tokens=["<|im_end|>"])
    text = f"{UNICODE_TEXT}\n{TOOL_CALL_JSON}<|im_end|>"
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    offsets = enc["offset_mapping"]
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    previous_start, covered = 0, 0
    for token_id, (start, end) in zip(enc["input_ids"], offsets, strict=True):
        assert previous_start <= start <= covered  # in order, without gaps
        assert start < end <= len(text)
        previous_start, covered = start, max(covered, end)
        piece = tok.decode([token_id])
        if "\ufffd" not in piece:  # a whole-character token maps to exactly its text
            assert text[start:end] == piece
    # each byte piece of a multi-byte character points at the whole character
    emoji_start = text.index("👋")
    emoji_spans = [span for span in offsets if span[0] == emoji_start]
    assert emoji_spans and all(span == (emoji_start, emoji_start + 1) for span in emoji_spans)
    assert offsets[-1] == (len(text) - len("<|im_end|>"), len(text))


def test_add_bos() -> None:
    tok = build_tokenizer(add_bos=True)
    assert tok.add_bos_token
    with_bos = tok("Hello")["input_ids"]
    without = tok("Hello", add_special_tokens=False)["input_ids"]
    assert with_bos == [tok.bos_token_id, *without]
    assert tok.decode(with_bos) == "<s>Hello"
    assert build_tokenizer()("Hello")["input_ids"] == without


def test_build_tokenizer_is_deterministic_and_fresh() -> None:
    a = build_tokenizer(special_tokens=["<x>"])
    b = build_tokenizer(special_tokens=["<x>"])
    assert a is not b
    assert a.get_vocab() == b.get_vocab()
    assert len(a) == 512
    a.add_special_tokens({"additional_special_tokens": ["<only-in-a>"]})
    assert "<only-in-a>" not in b.get_vocab()
    assert "<only-in-a>" not in build_tokenizer(special_tokens=["<x>"]).get_vocab()
    assert len(build_tokenizer(vocab_size=400)) == 400


def test_build_tokenizer_is_deterministic_across_processes() -> None:
    code = (
        "import hashlib; from sft.testing import _tokenizer_json; "
        "print(hashlib.sha256(_tokenizer_json(('<s>', '</s>'), '<s>', False, 512).encode())"
        ".hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_save_and_reload(tmp_path: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = template_tokenizer("chatml")
    tok.save_pretrained(tmp_path)
    again = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = f"<|im_start|>user\n{UNICODE_TEXT}<|im_end|>\n"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.chat_template == tok.chat_template
    assert again.decode(again(text)["input_ids"]) == text


def test_template_tables() -> None:
    assert sorted(p.stem for p in TEMPLATES.glob("*.jinja")) == STEMS
    for stem in STEMS:
        assert TEMPLATE_END_OF_TURN[stem] in template_special_tokens(stem)
        kwargs = template_tokenizer_kwargs(stem)
        assert kwargs["eos_token"] in kwargs["special_tokens"]
    assert template_special_tokens("chatml") == ["<|im_start|>", "<|im_end|>"]
    with pytest.raises(KeyError, match="unknown chat template"):
        template_special_tokens("nope")


# --- models --------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", MODEL_ARCHS)
def test_build_model_forward(arch: str) -> None:
    import torch

    tok = build_tokenizer(pad_token="<pad>")
    model = build_model(tok, arch)
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok)
    assert model.get_input_embeddings().weight.shape == (len(tok), 64)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) < 200_000
    ids = torch.tensor([tok.encode("Hello, world! How are you today?")])
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (1, ids.shape[1], len(tok))
    assert math.isfinite(out.loss.item())
    out.loss.backward()

    same = build_model(tok, arch)
    for (name, p), (_, q) in zip(
        model.state_dict().items(), same.state_dict().items(), strict=True
    ):
        assert torch.equal(p, q), name


def test_build_model_seed_and_options() -> None:
    import torch

    tok = build_tokenizer()
    state = torch.random.get_rng_state()
    a = build_model(tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is untouched
    b = build_model(tok, seed=1)
    assert not torch.equal(a.lm_head.weight, b.lm_head.weight)
    eager = build_model(tok, "gemma", attn_implementation="eager", num_layers=1, hidden_size=32)
    assert eager.config._attn_implementation == "eager"
    assert eager.config.num_hidden_layers == 1 and eager.config.head_dim == 8
    with pytest.raises(ValueError, match="unknown arch"):
        build_model(tok, "gpt2")


# --- chat templates ------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And what is the weather like there?"},
    {"role": "assistant", "content": "It is sunny and 21 degrees.\nAnything else?"},
]
ANSWERS = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]

# What the real templates render for CONVERSATION.
RENDERED = {
    "chatml": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
        "<|im_start|>user\nAnd what is the weather like there?<|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny and 21 degrees.\nAnything else?<|im_end|>\n"
    ),
    "qwen_tools": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
        "<|im_start|>user\nAnd what is the weather like there?<|im_end|>\n"
        "<|im_start|>assistant\nIt is sunny and 21 degrees.\nAnything else?<|im_end|>\n"
    ),
    "llama3": (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "You are a helpful assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThe capital of France is Paris.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd what is the weather like there?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        "It is sunny and 21 degrees.\nAnything else?<|eot_id|>"
    ),
    # The real v0.3 template drops the system message unless the last message is a user message.
    "mistral": (
        "<s>[INST] What is the capital of France?[/INST] The capital of France is Paris.</s>"
        "[INST] And what is the weather like there?[/INST]"
        " It is sunny and 21 degrees.\nAnything else?</s>"
    ),
    "gemma": (
        "<bos><start_of_turn>user\nYou are a helpful assistant.\n\n"
        "What is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\nThe capital of France is Paris.<end_of_turn>\n"
        "<start_of_turn>user\nAnd what is the weather like there?<end_of_turn>\n"
        "<start_of_turn>model\nIt is sunny and 21 degrees.\nAnything else?<end_of_turn>\n"
    ),
    "phi3": (
        "<|system|>\nYou are a helpful assistant.<|end|>\n"
        "<|user|>\nWhat is the capital of France?<|end|>\n"
        "<|assistant|>\nThe capital of France is Paris.<|end|>\n"
        "<|user|>\nAnd what is the weather like there?<|end|>\n"
        "<|assistant|>\nIt is sunny and 21 degrees.\nAnything else?<|end|>\n<|endoftext|>"
    ),
    # The last assistant turn (after the last user message) always gets a think block.
    "qwen3": (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
        "<|im_start|>user\nAnd what is the weather like there?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
        "It is sunny and 21 degrees.\nAnything else?<|im_end|>\n"
    ),
    "deepseek_r1": (
        "<｜begin▁of▁sentence｜>You are a helpful assistant."
        "<｜User｜>What is the capital of France?"
        "<｜Assistant｜>The capital of France is Paris.<｜end▁of▁sentence｜>"
        "<｜User｜>And what is the weather like there?"
        "<｜Assistant｜>It is sunny and 21 degrees.\nAnything else?<｜end▁of▁sentence｜>"
    ),
}

GENERATION_PROMPT = {
    "chatml": "<|im_start|>assistant\n",
    "qwen_tools": "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "[/INST]",  # the real template adds nothing: a prompt already ends with [/INST]
    "gemma": "<start_of_turn>model\n",
    "phi3": "<|assistant|>\n",
    "qwen3": "<|im_start|>assistant\n",
    "deepseek_r1": "<｜Assistant｜><think>\n",
}
# Where the history does not repeat the generation prompt: what it renders instead.
PROMPT_IN_HISTORY = {"deepseek_r1": "<｜Assistant｜>"}

# What the model generates before an assistant's content: Mistral's space after [/INST];
# Qwen3's (empty) think block on the last turn.
ANSWER_PREFIX = {"mistral": " "}
LAST_ANSWER_PREFIX = {"mistral": " ", "qwen3": "<think>\n\n</think>\n\n"}


@pytest.mark.parametrize("stem", STEMS)
def test_template_renders_like_the_original(stem: str) -> None:
    tok = template_tokenizer(stem)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == RENDERED[stem]
    ids = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text
    for special in template_special_tokens(stem):
        assert len(tok.encode(special, add_special_tokens=False)) == 1


@pytest.mark.parametrize("stem", STEMS)
def test_generation_tags_give_the_assistant_mask(stem: str) -> None:
    tok = template_tokenizer(stem)
    out = tok.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    assert len(mask) == len(ids) and set(mask) == {0, 1}
    eot = TEMPLATE_END_OF_TURN[stem]
    prefixes = [ANSWER_PREFIX.get(stem, ""), LAST_ANSWER_PREFIX.get(stem, "")]
    expected = [prefix + answer + eot for prefix, answer in zip(prefixes, ANSWERS, strict=True)]
    assert masked_runs(tok, ids, mask) == expected
    assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "".join(expected)
    eot_id = tok.convert_tokens_to_ids(eot)
    assert sum(m for i, m in zip(ids, mask, strict=True) if i == eot_id) == len(ANSWERS)


@pytest.mark.parametrize("stem", STEMS)
def test_generation_prompt(stem: str) -> None:
    tok = template_tokenizer(stem)
    prompt_messages = CONVERSATION[1:4]  # no system message, ends with a user turn
    prompt = tok.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
    plain = tok.apply_chat_template(prompt_messages, tokenize=False)
    header = GENERATION_PROMPT[stem]
    assert prompt.endswith(header)
    if stem == "mistral":
        assert prompt == plain
    elif stem == "phi3":
        assert (
            plain.endswith("<|end|>\n<|endoftext|>")
            and prompt == plain[: -len("<|endoftext|>")] + header
        )
    else:
        assert prompt == plain + header
    # the prompt is a prefix of the conversation with its answer, and the answer follows it
    full = tok.apply_chat_template([*prompt_messages, CONVERSATION[4]], tokenize=False)
    answer = LAST_ANSWER_PREFIX.get(stem, "") + ANSWERS[1] + TEMPLATE_END_OF_TURN[stem]
    if stem in PROMPT_IN_HISTORY:
        assert full.startswith(plain + PROMPT_IN_HISTORY[stem] + answer)
    else:
        assert full.startswith(prompt + answer)
    # and the mask of a prompt alone is empty
    out = tok.apply_chat_template(
        CONVERSATION[1:2],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_assistant_tokens_mask=True,
    )
    assert set(out["assistant_masks"]) == {0}


@pytest.mark.parametrize("stem", ["mistral", "gemma"])
def test_non_alternating_roles_raise(stem: str) -> None:
    from jinja2.exceptions import TemplateError

    tok = template_tokenizer(stem)
    bad = [
        {"role": "user", "content": "Hi"},
        {"role": "user", "content": "Hello?"},
        {"role": "assistant", "content": "Hi!"},
    ]
    with pytest.raises(TemplateError, match="alternate"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(TemplateError, match="alternate"):
        tok.apply_chat_template([{"role": "assistant", "content": "Hi!"}], tokenize=False)


def test_mistral_system_message_goes_into_a_final_user_message_only() -> None:
    tok = template_tokenizer("mistral")
    prompt = tok.apply_chat_template(CONVERSATION[:4], tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<s>[INST] What is the capital of France?[/INST] The capital of France is Paris.</s>"
        "[INST] You are a helpful assistant.\n\nAnd what is the weather like there?[/INST]"
    )
    full = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert "You are a helpful assistant." not in full
    assert not full.startswith(prompt)  # rendering a prefix is not a prefix of the rendering


def test_chatml_default_system_prompt_and_phi3_empty_system() -> None:
    chatml = template_tokenizer("chatml")
    text = chatml.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    phi3 = template_tokenizer("phi3")
    no_system = [{"role": "system", "content": ""}, *CONVERSATION[1:3]]
    assert phi3.apply_chat_template(no_system, tokenize=False).startswith("<|user|>\n")


def test_trimming_templates_trim_content() -> None:
    conversation = [
        {"role": "user", "content": "  Hi there \n"},
        {"role": "assistant", "content": "\n Hello!  \n"},
    ]
    for stem, prefix in [("llama3", ""), ("gemma", ""), ("mistral", " ")]:
        tok = template_tokenizer(stem)
        out = tok.apply_chat_template(
            conversation, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        runs = masked_runs(tok, out["input_ids"], out["assistant_masks"])
        assert runs == [prefix + "Hello!" + TEMPLATE_END_OF_TURN[stem]], stem


def test_token_straddling_the_generation_start_is_masked() -> None:
    """transformers masks every token overlapping a generation span: when a ChatML answer starts
    with a newline, the header's newline and the answer's merge into one "\\n\\n" token, which is
    masked, so the mask then covers one character of template text."""
    tok = template_tokenizer("chatml")
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\nParis"},
    ]
    out = tok.apply_chat_template(
        conversation,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        tokenizer_kwargs={"return_offsets_mapping": True},
    )
    text = tok.apply_chat_template(conversation, tokenize=False)
    masked = [i for i, m in enumerate(out["assistant_masks"]) if m]
    first = masked[0]
    assert tok.convert_ids_to_tokens(out["input_ids"][first]) == "ĊĊ"
    start, _ = out["offset_mapping"][first]
    assert text[start:].startswith("\n\nParis<|im_end|>")
    assert masked_runs(tok, out["input_ids"], out["assistant_masks"]) == ["\n\nParis<|im_end|>"]


# --- Qwen2.5 with tools --------------------------------------------------------------------------

# The real Qwen2.5-Instruct template, to check that qwen_tools.jinja renders exactly like it.
QWEN25_REFERENCE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "The city name"}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Get the local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def tool_call(name: str, **arguments: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [tool_call("get_weather", city="Paris")]},
    {"role": "tool", "name": "get_weather", "content": '{"temperature": 21, "condition": "sunny"}'},
    {"role": "assistant", "content": "It is sunny and 21 degrees in Paris."},
]

TWO_CALLS_CONVERSATION = [
    {"role": "user", "content": "Weather and time in Paris and London?"},
    {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            tool_call("get_weather", city="Paris"),
            tool_call("get_time", city="London"),
        ],
    },
    {"role": "tool", "name": "get_weather", "content": "sunny, 21 degrees"},
    {"role": "tool", "name": "get_time", "content": "15:30"},
    {"role": "assistant", "content": "Paris: sunny, 21 degrees. London: 15:30."},
    {"role": "user", "content": "Thanks!"},
]


def test_qwen_tools_mask() -> None:
    tok = template_tokenizer("qwen_tools")
    out = tok.apply_chat_template(
        TOOL_CONVERSATION,
        tools=[WEATHER_TOOL],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    text = tok.decode(out["input_ids"])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert "<tools>\n" + json.dumps(WEATHER_TOOL) + "\n</tools>" in text
    assert (
        "<|im_start|>user\n<tool_response>\n"
        '{"temperature": 21, "condition": "sunny"}\n</tool_response><|im_end|>\n'
    ) in text
    assert masked_runs(tok, out["input_ids"], out["assistant_masks"]) == [
        f"<tool_call>\n{TOOL_CALL_JSON}\n</tool_call><|im_end|>",
        "It is sunny and 21 degrees in Paris.<|im_end|>",
    ]
    assert text.endswith("<|im_start|>assistant\nIt is sunny and 21 degrees in Paris.<|im_end|>\n")


def test_qwen_tools_groups_tool_messages_and_keeps_content_before_calls() -> None:
    tok = template_tokenizer("qwen_tools")
    out = tok.apply_chat_template(
        TWO_CALLS_CONVERSATION,
        tools=[WEATHER_TOOL, TIME_TOOL],
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    text = tok.decode(out["input_ids"])
    assert text.startswith(
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    assert text.count("<|im_start|>user\n<tool_response>") == 1
    assert "\n</tool_response>\n<tool_response>\n15:30\n</tool_response><|im_end|>\n" in text
    assert masked_runs(tok, out["input_ids"], out["assistant_masks"]) == [
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"city": "London"}}\n</tool_call><|im_end|>',
        "Paris: sunny, 21 degrees. London: 15:30.<|im_end|>",
    ]


@pytest.mark.parametrize(
    ("messages", "tools"),
    [
        (CONVERSATION, None),
        (CONVERSATION[1:], None),
        (TOOL_CONVERSATION, [WEATHER_TOOL]),
        (TOOL_CONVERSATION[1:], [WEATHER_TOOL]),
        (TWO_CALLS_CONVERSATION, [WEATHER_TOOL, TIME_TOOL]),
        (TWO_CALLS_CONVERSATION[:4], None),
        (
            [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "tool_calls": [tool_call("get_time", city="Tokyo")]},
                {"role": "tool", "content": "09:00"},
            ],
            [TIME_TOOL],
        ),
    ],
)
def test_qwen_tools_renders_like_qwen25(messages: list[dict[str, Any]], tools: Any) -> None:
    tok = template_tokenizer("qwen_tools")
    for add_generation_prompt in (False, True):
        ours = tok.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        reference = tok.apply_chat_template(
            messages,
            tools=tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            chat_template=QWEN25_REFERENCE,
        )
        assert ours == reference
