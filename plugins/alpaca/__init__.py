"""`type = "alpaca"`: instruction / input / output rows in the Alpaca prompt format, and
`type = "alpaca:chat"` (also `alpaca_chat`), Axolotl's chat style of the same rows:
`USER: {instruction}\n{input}\nASSISTANT:`."""

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
    field_instruction: str = key("instruction", doc="Alpaca: row field with the instruction.")
    field_input: str = key("input", doc="Alpaca: row field with the optional input.")
    field_output: str = key("output", doc="Alpaca: row field with the response (trained).")
    system_prompt: str | None = key(
        None, doc="Alpaca: replaces the standard 'Below is an instruction...' preamble."
    )
    system_format: str = key("{system}\n\n", doc="Alpaca: how the preamble is written ({system}).")
    format: str | None = key(
        None,
        doc="Alpaca: prompt when the row has an input ({instruction}, {input}); default "
        "'### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n' "
        "('USER: {instruction}\\n{input}\\nASSISTANT:' for alpaca:chat).",
    )
    no_input_format: str | None = key(
        None,
        doc="Alpaca: prompt when the input is empty ({instruction}); default "
        "'### Instruction:\\n{instruction}\\n\\n### Response:\\n' "
        "('USER: {instruction}\\nASSISTANT:' for alpaca:chat).",
    )


@attrs.frozen
class PromptStyle:
    format: str
    no_input_format: str


INSTRUCT = PromptStyle(
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    "### Instruction:\n{instruction}\n\n### Response:\n",
)
CHAT = PromptStyle("USER: {instruction}\n{input}\nASSISTANT:", "USER: {instruction}\nASSISTANT:")
STYLES = {"alpaca": INSTRUCT, "alpaca:chat": CHAT, "alpaca_chat": CHAT}


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    keys: AlpacaKeys = ds.section(AlpacaKeys)
    style = STYLES[ds.type]
    with_input = keys.format if keys.format is not None else style.format
    no_input = keys.no_input_format if keys.no_input_format is not None else style.no_input_format
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> Rendered:
        instruction = require(row, keys.field_instruction)
        output = require(row, keys.field_output)
        raw_input = row.get(keys.field_input)
        if raw_input is not None and not isinstance(raw_input, str):
            raise RowError(
                "wrong type", f"field {keys.field_input!r} should be a string", keys.field_input
            )
        has_input = bool(raw_input and raw_input.strip())
        preamble = keys.system_prompt or (PREAMBLE_WITH_INPUT if has_input else PREAMBLE_NO_INPUT)
        template = with_input if has_input else no_input
        prompt = keys.system_format.format(system=preamble) + template.format(
            instruction=instruction, input=raw_input or ""
        )
        text = f"{prompt}{output}{eos}"
        return Rendered(text=text, spans=((len(prompt), len(text)),), add_special_tokens=True)

    return render


@hookimpl
def sft_validate_config(config: Any) -> list[Problem]:
    problems = []
    for where, ds in config.all_datasets():
        if ds.type not in STYLES:
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
    return [ConfigKeys(AlpacaKeys, scope="dataset")]


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "alpaca", _factory, "instruction/input/output rows; trains the output and EOS"
        )
    )
    for name in ("alpaca:chat", "alpaca_chat"):
        register(
            PromptStrategy(
                name,
                _factory,
                "alpaca rows in Axolotl's chat style (USER: … ASSISTANT:); trains the output "
                "and EOS",
            )
        )
