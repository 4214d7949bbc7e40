"""`type = "dolly"`: instruction / context / response rows; trains the response and EOS."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from sft import plugin


@attrs.frozen
class DollyKeys:
    dolly_context_heading: str = plugin.key("Context", doc="Dolly: heading of the context block.")


def render_dolly(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Any]:
    heading = ds.section(DollyKeys).dolly_context_heading
    eos = tokenizer.eos_token or ""

    def render(row: dict[str, Any]) -> plugin.Rendered:
        instruction = plugin.require(row, "instruction")
        response = plugin.require(row, "response")
        context = row.get("context") or ""
        if not isinstance(context, str):
            raise plugin.RowError("wrong type", "field 'context' should be a string", "context")
        prompt = f"### Instruction:\n{instruction}\n\n"
        if context.strip():
            prompt += f"### {heading}:\n{context}\n\n"
        prompt += "### Response:\n"
        text = f"{prompt}{response}{eos}"
        # Train the response and EOS (the characters after the prompt); the tokenizer adds
        # its own BOS, if it has one.
        return plugin.Rendered(
            text=text, spans=((len(prompt), len(text)),), add_special_tokens=True
        )

    return render


@plugin.hookimpl
def sft_config_keys() -> list[plugin.ConfigKeys]:
    return [plugin.ConfigKeys(DollyKeys, scope="dataset")]


@plugin.hookimpl
def sft_register_prompt_strategies(register: Callable[[plugin.PromptStrategy], None]) -> None:
    register(
        plugin.PromptStrategy("dolly", render_dolly, "Dolly rows: instruction, context, response")
    )
