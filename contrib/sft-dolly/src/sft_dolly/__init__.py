"""`type = "dolly"`: instruction / context / response rows; trains the response and EOS."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, PromptStrategy
from sft.config.schema import key
from sft.data.sample import Rendered, RowError, require


@attrs.frozen
class DollyKeys:
    dolly_context_heading: str = key("Context", doc="Dolly: heading of the context block.")


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    heading = ds.section(DollyKeys).dolly_context_heading
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> Rendered:
        instruction = require(row, "instruction")
        response = require(row, "response")
        context = row.get("context") or ""
        if not isinstance(context, str):
            raise RowError("wrong type", "field 'context' should be a string", "context")
        prompt = f"### Instruction:\n{instruction}\n\n"
        if context.strip():
            prompt += f"### {heading}:\n{context}\n\n"
        prompt += "### Response:\n"
        text = f"{prompt}{response}{eos}"
        return Rendered(text=text, spans=((len(prompt), len(text)),), add_special_tokens=True)

    return render


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(DollyKeys, scope="dataset")]


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(PromptStrategy("dolly", _factory, "Dolly rows: instruction, context, response"))
