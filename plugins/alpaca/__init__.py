"""Axolotl's instruction dataset types: one instruction, an optional input and a response per
row, written in a prompt format, the response (and EOS) trained.

`type = "alpaca"` is the Alpaca prompt; `"<base>:<style>"` writes the same rows in another of
Axolotl's prompt styles (`instruct`, `chat`, `chatml`, `phi`; `alpaca_chat` is `alpaca:chat`).
The other bases read other datasets' fields, as Axolotl's loaders do: `jeopardy`
(question / category / "what is " + answer), `oasst` (INSTRUCTION / RESPONSE), `gpteacher`
(instruction / input / response), `explainchoice` (question / choices / solution or
explanation), and, each in one fixed format, `concisechoice` and `summarizetldr`
(article / summary). Texts equal Axolotl's prompters' character for character (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, PromptStrategy
from sft.config.schema import key
from sft.data.sample import Rendered, RowError, require
from sft.errors import Problem

PREAMBLE_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request."
)
PREAMBLE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)


@attrs.frozen
class AlpacaKeys:
    field_instruction: str | None = key(
        None, doc="Instruction types: row field with the instruction (default per type)."
    )
    field_input: str | None = key(
        None, doc="Instruction types: row field with the optional input (default per type)."
    )
    field_output: str | None = key(
        None, doc="Instruction types: row field with the response, trained (default per type)."
    )
    system_prompt: str | None = key(
        None, doc="Instruction types: replaces the type's preamble ('Below is an instruction...')."
    )
    system_format: str | None = key(
        None,
        doc="Instruction types: how the preamble is written ({system}); default the style's "
        "('{system}\\n\\n' for alpaca, 'SYSTEM: {system}\\n' for alpaca:chat).",
    )
    format: str | None = key(
        None,
        doc="Instruction types: prompt when the row has an input ({instruction}, {input}); "
        "default the style's ('### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n"
        "### Response:\\n' for alpaca, 'USER: {instruction}\\n{input}\\nASSISTANT:' for "
        "alpaca:chat).",
    )
    no_input_format: str | None = key(
        None,
        doc="Instruction types: prompt when the input is empty ({instruction}); default the "
        "style's ('### Instruction:\\n{instruction}\\n\\n### Response:\\n' for alpaca, "
        "'USER: {instruction}\\nASSISTANT:' for alpaca:chat).",
    )


@attrs.frozen
class ConversationKeys:
    """Axolotl's `conversation`: read by alpaca_chat as its prompt style, and by Axolotl's old
    sharegpt type; on any other dataset a no-effect warning (not an error: migrated sharegpt
    configs keep it)."""

    conversation: str | None = key(
        None,
        doc="alpaca_chat: the prompt style of its rows, as Axolotl reads it (instruct, chat, "
        "chatml or phi; default chat). No effect on other types.",
    )


@attrs.frozen
class PromptStyle:
    format: str
    no_input_format: str
    system_format: str


# Axolotl's `PromptStyle`s (axolotl.prompters.AlpacaPrompter.match_prompt_style).
STYLES = {
    "instruct": PromptStyle(
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "{system}\n\n",
    ),
    "chat": PromptStyle(
        "USER: {instruction}\n{input}\nASSISTANT:",
        "USER: {instruction}\nASSISTANT:",
        "SYSTEM: {system}\n",
    ),
    "chatml": PromptStyle(
        "<|im_start|>user\n{instruction}\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>system\n{system}<|im_end|>\n",
    ),
    "phi": PromptStyle(
        "<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        "<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
        "<|system|>\n{system}<|end|>\n",
    ),
}


def _text(row: dict[str, Any], field: str, key_name: str) -> str:
    value = require(row, field, key=key_name)
    assert isinstance(value, str)
    return value


def _optional_text(row: dict[str, Any], field: str, key_name: str) -> str:
    value = row.get(field)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RowError("wrong type", f"field {field!r} should be a string", field, key_name)
    return value


def _choices(row: dict[str, Any], field: str, key_name: str) -> str:
    value = require(row, field, (list, tuple), key=key_name)
    assert isinstance(value, (list, tuple))
    return "\n".join(f'- "{choice}"' for choice in value)


@attrs.frozen
class Fields:
    """How a base type reads a row: default field names and any rewriting of the values."""

    instruction: str
    input: str | None
    output: str
    output_fallback: str | None = None  # explainchoice: `solution`, else `explanation`
    output_prefix: str = ""  # jeopardy: "what is " + answer
    input_is_choices: bool = False  # explainchoice / concisechoice: the choices as a list

    def read(self, row: dict[str, Any], keys: AlpacaKeys) -> tuple[str, str, str]:
        instruction = _text(row, keys.field_instruction or self.instruction, "field_instruction")
        input_field = keys.field_input or self.input
        if input_field is None:
            input_text = ""
        elif self.input_is_choices:
            input_text = _choices(row, input_field, "field_input")
        else:
            input_text = _optional_text(row, input_field, "field_input")
        output_field = keys.field_output or self.output
        if self.output_fallback and not keys.field_output and row.get(output_field) is None:
            output_field = self.output_fallback
        output = self.output_prefix + _text(row, output_field, "field_output")
        return instruction, input_text, output


@attrs.frozen
class Base:
    """One of Axolotl's instruction dataset types (`DATASET_HANDLERS`)."""

    fields: Fields
    description: str
    preamble: tuple[str, str] = (PREAMBLE_WITH_INPUT, PREAMBLE_NO_INPUT)  # with / without input
    fixed_style: PromptStyle | None = None  # its own format: takes no `:style`


BASES = {
    "alpaca": Base(Fields("instruction", "input", "output"), "instruction/input/output rows"),
    "jeopardy": Base(
        Fields("question", "category", "answer", output_prefix="what is "),
        "Jeopardy rows: question, category as the input, 'what is ' + answer trained",
    ),
    "oasst": Base(Fields("INSTRUCTION", None, "RESPONSE"), "OpenAssistant INSTRUCTION/RESPONSE"),
    "gpteacher": Base(Fields("instruction", "input", "response"), "GPTeacher rows"),
    "explainchoice": Base(
        Fields("question", "choices", "solution", "explanation", input_is_choices=True),
        "multiple choice: question, choices, the solution (or explanation) trained",
        preamble=("Choose the answer that best answers the question. Explain your reasoning.\n",)
        * 2,
    ),
    "concisechoice": Base(
        Fields("question", "choices", "solution", "explanation", input_is_choices=True),
        "multiple choice, concise: question, choices, the solution (or explanation) trained",
        preamble=("Choose the answer that best answers the question. Be concise in your response.",)
        * 2,
        fixed_style=PromptStyle(
            "USER: {instruction}\n{input}\nASSISTANT:",
            "USER: {instruction}\nASSISTANT:",
            "{system}\n\n",
        ),
    ),
    "summarizetldr": Base(
        Fields("article", None, "summary"),
        "article/summary rows, a TL;DR prompt",
        preamble=("", ""),
        fixed_style=PromptStyle(
            "USER: Summarize the following article as a TL;DR.\n{instruction}\n{input}\nASSISTANT:",
            "USER: Summarize the following article as a TL;DR.\n{instruction}\nASSISTANT:",
            "{system}\n",  # no preamble of its own; a system_prompt gets a line
        ),
    ),
}


def _types() -> dict[str, tuple[Base, PromptStyle]]:
    """Every type name this plugin registers: `base`, `base:style`, and `alpaca_chat`."""
    names: dict[str, tuple[Base, PromptStyle]] = {}
    for name, base in BASES.items():
        if base.fixed_style is not None:
            names[name] = (base, base.fixed_style)
            continue
        names[name] = (base, STYLES["instruct"])
        for style_name, style in STYLES.items():
            names[f"{name}:{style_name}"] = (base, style)
    names["alpaca_chat"] = names["alpaca:chat"]
    return names


TYPES = _types()


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    keys: AlpacaKeys = ds.section(AlpacaKeys)
    base, style = TYPES[ds.type]
    conversation = ds.section(ConversationKeys).conversation
    if ds.type == "alpaca_chat" and conversation:
        style = STYLES[conversation]
    with_input = keys.format if keys.format is not None else style.format
    no_input = keys.no_input_format if keys.no_input_format is not None else style.no_input_format
    system_format = keys.system_format if keys.system_format is not None else style.system_format
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> Rendered:
        instruction, input_text, output = base.fields.read(row, keys)
        # Axolotl's test: any non-empty input (whitespace too) takes the with-input prompt
        preamble = keys.system_prompt or base.preamble[0 if input_text else 1]
        template = with_input if input_text else no_input
        prompt = (system_format.format(system=preamble) if preamble else "") + template.format(
            instruction=instruction, input=input_text
        )
        text = f"{prompt}{output}{eos}"
        return Rendered(text=text, spans=((len(prompt), len(text)),), add_special_tokens=True)

    return render


def _conversation_problems(where: str, ds: Any) -> list[Problem]:
    conversation = ds.section(ConversationKeys).conversation
    if not conversation:
        return []
    if ds.type != "alpaca_chat":
        written = f"'alpaca:{conversation}'" if conversation in STYLES else "'alpaca_chat'"
        return [
            Problem(
                f"{where}.conversation",
                f"has no effect on type {ds.type!r}: Axolotl reads it only for alpaca_chat "
                "(and its removed sharegpt type)",
                hint=f"remove it; for an Alpaca style write type = {written}",
                warning=True,
            )
        ]
    if conversation not in STYLES:
        return [
            Problem(
                f"{where}.conversation",
                f"unknown prompt style {conversation!r} for alpaca_chat",
                hint=f"one of {', '.join(STYLES)}",
            )
        ]
    return []


@hookimpl
def sft_validate_config(config: Any) -> list[Problem]:
    problems = []
    for where, ds in config.all_datasets():
        problems += _conversation_problems(where, ds)
        if ds.type not in TYPES:
            continue
        keys = ds.section(AlpacaKeys)
        for name, text, fields in (
            ("format", keys.format, {"instruction": "", "input": ""}),
            ("no_input_format", keys.no_input_format, {"instruction": "", "input": ""}),
            ("system_format", keys.system_format, {"system": ""}),
        ):
            if text is None:
                continue
            try:
                text.format(**fields)
            except (KeyError, IndexError, ValueError) as exc:
                allowed = ", ".join("{" + f + "}" for f in fields)
                problems.append(
                    Problem(
                        f"{where}.{name}",
                        f"bad placeholder ({type(exc).__name__}: {exc}); use {allowed}",
                    )
                )
    return problems


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [
        ConfigKeys(AlpacaKeys, scope="dataset"),
        ConfigKeys(ConversationKeys, scope="dataset", dataset_types=()),  # said on any type
    ]


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    for name, (base, _) in TYPES.items():
        style = name.partition(":")[2] or ("chat" if name == "alpaca_chat" else "")
        written = f" in Axolotl's {style} prompt style" if style else ""
        register(
            PromptStrategy(
                name, _factory, f"{base.description}{written}; trains the response and EOS"
            )
        )
