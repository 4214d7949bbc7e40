"""Tiny, deterministic tokenizers and models for tests.

Everything here is built offline in well under a second: a byte-level BPE tokenizer trained on a
small built-in English corpus, and random-init causal LMs of a few popular architectures. Heavy
libraries (tokenizers, transformers, torch) are imported inside the functions so importing this
module stays cheap.

The chat templates that go with these tokenizers live in ``tests/assets/chat_templates/``; the
`TEMPLATE_END_OF_TURN` table and `template_special_tokens` / `template_tokenizer_kwargs` say which
special tokens each of them needs::

    text = (ASSETS / "chatml.jinja").read_text()
    tok = build_tokenizer(chat_template=text, **template_tokenizer_kwargs("chatml"))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = [
    "CHATML_TEMPLATE",
    "MODEL_ARCHS",
    "TEMPLATE_END_OF_TURN",
    "TRAINING_CORPUS",
    "build_model",
    "build_tokenizer",
    "listed_plugins",
    "template_special_tokens",
    "template_tokenizer_kwargs",
]

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""A minimal ChatML chat template (`<|im_start|>role\\n...<|im_end|>\\n`)."""

TRAINING_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "I am fine, thank you. And you?",
    "What is the capital of France? The capital of France is Paris.",
    "What is the weather like in Paris today? It is sunny and 21 degrees.",
    "Please answer the question as briefly as you can.",
    "You are a helpful assistant. Answer the user's questions honestly.",
    "Sure! Here is a short answer: yes, it is.",
    "No, that's not right; the answer is 42.",
    "There are 365 days in a year, 24 hours in a day and 60 minutes in an hour.",
    "In 1969, two astronauts walked on the Moon for the first time.",
    "The price is $19.99 (or 17.50 EUR), including 20% tax.",
    "Call me at 555-0123 between 9:00 and 17:30.",
    "Can you write a poem about the sea?",
    "The sea is deep and blue, and the waves roll in again and again.",
    "Tell me a joke. Why did the chicken cross the road? To get to the other side!",
    "Summarize the following text in one sentence.",
    "Translate this sentence into French: where is the train station?",
    "First, preheat the oven to 180 degrees. Then, mix the flour, sugar and eggs.",
    "Step 1: open the file.\nStep 2: read the data.\nStep 3: close the file.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "She said, \"I'll be there at noon.\" He replied, 'See you then.'",
    "It's a beautiful day, isn't it? We're going to the park; they've already left.",
    "The model was trained on 1,000,000 examples for 3 epochs.",
    "Learning rate: 0.0001, batch size: 32, warmup steps: 100.",
    "Good morning! Good afternoon! Good evening! Good night!",
    "Thank you very much for your help. You're welcome!",
    "What time is it? It is half past three in the afternoon.",
    "My name is Alice and I live in London with my cat, Bob.",
    "How many people live in Tokyo? About 14 million people live there.",
    "The user asked a question, and the assistant gave a helpful answer.",
    "This is a list:\n- apples\n- oranges\n- bananas\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 2024 3.14 -7",
    "Punctuation: . , ; : ! ? ' \" ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `",
    '{"name": "get_weather", "arguments": {"city": "Paris"}}',
    '{"name": "get_time", "arguments": {"timezone": "Europe/London"}}',
    '{"name": "search", "arguments": {"query": "best pizza in New York", "limit": 5}}',
    '{"temperature": 21, "unit": "celsius", "condition": "sunny"}',
    '{"type": "function", "function": {"name": "get_weather", "description": '
    '"Get the current weather", "parameters": {"type": "object", "properties": '
    '{"city": {"type": "string"}}, "required": ["city"]}}}',
    '[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]',
    "The result is true, not false, and the value is null.",
    "Once upon a time, there was a little girl who lived in a village near the forest.",
    "Every morning she walked to school, and every evening she came back home.",
    "Water boils at 100 degrees Celsius and freezes at 0 degrees.",
    "The Earth goes around the Sun once every year.",
    "Can you help me fix this bug? The function returns None instead of a list.",
    "Of course. The problem is on line 12: you forgot to return the result.",
    "Let's think step by step. First, 2 + 3 = 5. Then, 5 * 4 = 20.",
    "Therefore, the final answer is 20.",
    "I don't know the answer to that question, sorry.",
    "Please be polite, clear and concise in your answers.",
    "Why is the sky blue? Because air scatters blue light more than red light.",
    "The meeting is on Monday, March 3rd, at 10 a.m. in room 204.",
    "Dear Sir or Madam,\n\nI am writing to ask about your opening hours.\n\nBest regards,\nJohn",
    "What should I cook for dinner tonight? How about pasta with tomato sauce?",
    "The weather in Paris is sunny, while in London it is cloudy with light rain.",
    "Here are three tips: sleep well, eat well, and exercise every day.",
    "  Indented text with    several   spaces and\ttabs.\n\n",
    "Is it true? Yes! Really? Really. Okay... fine.",
    "Dear team,\n\nThe report is attached.\n\nThanks,\nMaria",
    "First paragraph.\n\nSecond paragraph.\n\nThird paragraph.\n\n",
    "Title\n\nSome body text goes here\n\nAnd the end\n\nNotes\n\nMore notes\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    'if x > 0:\n    print("positive")\nelse:\n    print("not positive")\n',
)
"""The text the test tokenizer is trained on (varied English, digits, punctuation and JSON)."""

SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
"""The pre-tokenization regex of the Qwen2 tokenizers (Llama 3's, with single digits): newlines
are grouped (``"\\n\\n"`` is one piece), a space or punctuation mark is glued to the word after it,
and punctuation keeps the newlines after it."""

MODEL_ARCHS: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma")
"""The architectures `build_model` supports."""

TEMPLATE_END_OF_TURN: dict[str, str] = {
    "chatml": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "mistral": "</s>",
    "gemma": "<end_of_turn>",
    "phi3": "<|end|>",
    "qwen_tools": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "deepseek_r1": "<｜end▁of▁sentence｜>",
}
"""Chat template file stem (``tests/assets/chat_templates/<stem>.jinja``) → end-of-turn token."""

# stem -> (bos_token, eos_token, add_bos, other special tokens), as in the real model family's
# tokenizer (the bos/eos are what the template reads as `bos_token` / `eos_token`).
_TEMPLATE_TOKENS: dict[str, tuple[str | None, str, bool, tuple[str, ...]]] = {
    "chatml": ("<|im_start|>", "<|im_end|>", False, ("<|im_start|>", "<|im_end|>")),
    "llama3": (
        "<|begin_of_text|>",
        "<|eot_id|>",
        True,
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "mistral": ("<s>", "</s>", True, ("<s>", "</s>", "[INST]", "[/INST]")),
    "gemma": ("<bos>", "<eos>", True, ("<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>")),
    "phi3": (
        "<s>",
        "<|endoftext|>",
        False,
        ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
    "qwen_tools": (
        None,
        "<|im_end|>",
        False,
        (
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<tool_call>",
            "</tool_call>",
            "<tool_response>",
            "</tool_response>",
        ),
    ),
    "qwen3": (
        None,
        "<|im_end|>",
        False,
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    ),
    "deepseek_r1": (
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        False,
        (
            "<｜begin▁of▁sentence｜>",
            "<｜end▁of▁sentence｜>",
            "<｜User｜>",
            "<｜Assistant｜>",
            "<think>",
            "</think>",
        ),
    ),
}


def _template_entry(stem: str) -> tuple[str | None, str, bool, tuple[str, ...]]:
    try:
        return _TEMPLATE_TOKENS[stem]
    except KeyError:
        known = ", ".join(sorted(_TEMPLATE_TOKENS))
        raise KeyError(f"unknown chat template {stem!r}; known: {known}") from None


def template_special_tokens(stem: str) -> list[str]:
    """The special tokens the chat template ``<stem>.jinja`` needs, bos/eos included."""
    return list(_template_entry(stem)[3])


def template_tokenizer_kwargs(stem: str) -> dict[str, Any]:
    """Keyword arguments for `build_tokenizer` matching the real tokenizer of the template's family.

    Gives ``special_tokens``, ``bos_token``, ``eos_token`` and ``add_bos`` (the Llama 3, Mistral and
    Gemma tokenizers add the bos token themselves; their templates also render it, as the real ones do).
    """
    bos, eos, add_bos, specials = _template_entry(stem)
    return {
        "special_tokens": list(specials),
        "bos_token": bos,
        "eos_token": eos,
        "add_bos": add_bos,
    }


def _dedupe(tokens: Sequence[str | None]) -> list[str]:
    seen: list[str] = []
    for token in tokens:
        if token is not None and token not in seen:
            seen.append(token)
    return seen


@functools.cache
def _tokenizer_json(
    special_tokens: tuple[str, ...], bos_token: str | None, add_bos: bool, vocab_size: int
) -> str:
    """Train the byte-level BPE and return its serialized ``tokenizer.json`` (cached)."""
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TRAINING_CORPUS, trainer=trainer, length=len(TRAINING_CORPUS))
    if add_bos:
        if bos_token is None:
            raise ValueError("add_bos=True needs a bos_token")
        bos_id = tokenizer.token_to_id(bos_token)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_token}:0 $A:0",
            pair=f"{bos_token}:0 $A:0 {bos_token}:1 $B:1",
            special_tokens=[(bos_token, bos_id)],
        )
    return tokenizer.to_str()


def build_tokenizer(
    chat_template: str | None = None,
    *,
    special_tokens: Sequence[str] = (),
    bos_token: str | None = "<s>",
    eos_token: str = "</s>",
    pad_token: str | None = None,
    unk_token: str | None = None,
    add_bos: bool = False,
    vocab_size: int = 512,
) -> PreTrainedTokenizerFast:
    """A small deterministic byte-level BPE tokenizer (a fresh object on every call).

    The BPE is trained on `TRAINING_CORPUS` (pre-tokenized with `SPLIT_PATTERN`, then byte-level
    without a prefix space). The unk, pad, bos and eos tokens that are set, then `special_tokens`,
    become special tokens with the first ids of the vocabulary, each encoded as one id. Offsets are
    character offsets into the input, and ``decode(encode(text))`` gives back ``text`` exactly (no
    clean-up of tokenization spaces). With `add_bos`, encoding with ``add_special_tokens=True``
    prepends the bos token (``apply_chat_template`` encodes without it, as usual). The result is
    cached per arguments (about 20 ms the first time); every call returns a fresh tokenizer.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    specials = tuple(_dedupe([unk_token, pad_token, bos_token, eos_token, *special_tokens]))
    backend = Tokenizer.from_str(_tokenizer_json(specials, bos_token, add_bos, vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        unk_token=unk_token,
        add_bos_token=add_bos,
        add_eos_token=False,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    extra = [
        t
        for t in _dedupe(list(special_tokens))
        if t not in (bos_token, eos_token, pad_token, unk_token)
    ]
    if extra:
        tokenizer.add_special_tokens({"additional_special_tokens": extra})
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A tiny random-init float32 causal LM of `arch` ("llama", "mistral", "qwen2" or "gemma").

    The vocabulary size is ``len(tokenizer)`` and the pad/bos/eos ids come from the tokenizer. Weights
    are drawn after ``torch.manual_seed(seed)`` (inside a forked RNG, so the caller's RNG state is
    untouched): two calls with the same arguments give identical weights.
    """
    import torch
    from transformers import (
        GemmaConfig,
        GemmaForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes: dict[str, tuple[Any, Any]] = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "gemma": (GemmaConfig, GemmaForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(MODEL_ARCHS)}")
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, and num_heads by num_kv_heads")
    config_cls, model_cls = classes[arch]
    kwargs: dict[str, Any] = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings,
        "head_dim": hidden_size // num_heads,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "mistral":
        kwargs["sliding_window"] = None
    config = config_cls(**kwargs)
    config._attn_implementation = attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    model = model.to(torch.float32)
    model.eval()
    return model


def listed_plugins() -> dict[str, dict[str, Any]]:
    """`sft plugins list --json`, run as a user would (a fresh process): rows by plugin name."""
    import json
    import subprocess
    import sys

    listed = subprocess.run(
        [sys.executable, "-m", "sft", "plugins", "list", "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return {row["name"]: row for row in json.loads(listed.stdout)}
