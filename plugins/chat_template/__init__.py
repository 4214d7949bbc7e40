"""`type = "chat_template"`: conversations rendered with a chat template, labels by turn.

Labels come from the template's own renderings, never from a list of marker strings. The
package, by job:

- `keys.py`: the config keys (top-level and per dataset);
- `templates.py`: which template a config selects, and what is wrong with it;
- `messages.py`: a row → the messages and tools the template sees;
- `layout.py`: where each turn's generated text and end-of-turn marker are in the rendering;
- `strategy.py`: the prompt strategy tying them together;
- `mistral.py`: conversations encoded by mistral-common (no Jinja template).

The core then tokenises the full text once, with offsets, and trains the tokens inside the spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sft import plugin
from sft.plugins.chat_template.keys import (
    ChatTemplateDatasetKeys,
    ChatTemplateKeys,
    mapping_problems,
)
from sft.plugins.chat_template.mistral import is_mistral_common, mistral_common_problems
from sft.plugins.chat_template.strategy import make_strategy
from sft.plugins.chat_template.templates import (
    find_template,
    resolve_template,
    template_variable_problems,
)


@plugin.hookimpl
def sft_config_keys() -> Sequence[plugin.ConfigKeys]:
    return [
        plugin.ConfigKeys(ChatTemplateKeys),
        plugin.ConfigKeys(ChatTemplateDatasetKeys, scope="dataset"),
    ]


@plugin.hookimpl
def sft_validate_config(config: plugin.Config) -> list[plugin.Problem]:
    root = config.section(ChatTemplateKeys)
    _, problems = find_template(root.chat_template, root.chat_template_jinja, "chat_template")
    for where, ds in config.all_datasets():
        keys = ds.section(ChatTemplateDatasetKeys)
        problems += find_template(
            keys.chat_template, keys.chat_template_jinja, f"{where}.chat_template"
        )[1]
        problems += mapping_problems(keys, where)
    problems += template_variable_problems(root.chat_template_kwargs)
    if config.tokenizer_use_mistral_common:
        problems += mistral_common_problems(config)
    chat_datasets = [ds for _, ds in config.all_datasets() if ds.type == "chat_template"]
    if root.default_system_message and not chat_datasets:
        problems.append(
            plugin.Problem(
                "default_system_message",
                "has no effect: no dataset has type = 'chat_template' (it is added to the "
                "conversations of those)",
                hint="remove default_system_message, or use a chat_template dataset",
                warning=True,
            )
        )
    if root.eot_tokens and all(
        ds.section(ChatTemplateDatasetKeys).eot_tokens for ds in chat_datasets
    ):
        problems.append(
            plugin.Problem(
                "eot_tokens",
                "has no effect: it applies to chat_template datasets that set no eot_tokens of "
                "their own, and there is none",
                hint="remove the top-level eot_tokens",
                warning=True,
            )
        )
    return problems


@plugin.hookimpl
def sft_prepare_tokenizer(tokenizer: Any, config: plugin.Config) -> None:
    if is_mistral_common(tokenizer):
        return  # mistral-common encodes conversations itself (no Jinja template)
    root = config.section(ChatTemplateKeys)
    if root.chat_template not in (None, "tokenizer_default") or root.chat_template_jinja:
        tokenizer.chat_template = resolve_template(
            root.chat_template, root.chat_template_jinja, tokenizer, "chat_template"
        )


@plugin.hookimpl
def sft_register_prompt_strategies(register: Callable[[plugin.PromptStrategy], None]) -> None:
    register(
        plugin.PromptStrategy(
            "chat_template",
            make_strategy,
            "conversations (OpenAI messages, ShareGPT via roles + message_property_mappings), "
            "rendered with a chat template; trains the turns of roles_to_train",
        )
    )
