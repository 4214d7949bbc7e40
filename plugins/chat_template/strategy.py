"""One chat_template dataset row → its rendered conversation and trainable spans."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from sft.config.schema import Config, DatasetConfig
from sft.data.sample import Rendered, RowError, Sample
from sft.errors import ConfigError, Problem
from sft.plugins.chat_template.keys import (
    ChatTemplateDatasetKeys,
    ChatTemplateKeys,
    message_mappings,
)
from sft.plugins.chat_template.layout import Policies, TurnLocator
from sft.plugins.chat_template.messages import MessageReader
from sft.plugins.chat_template.mistral import MistralChatStrategy, is_mistral_common
from sft.plugins.chat_template.rendering import TemplateRenderer
from sft.plugins.chat_template.templates import resolve_template


def message_reader(
    keys: ChatTemplateDatasetKeys, root: ChatTemplateKeys, content_chunks: bool = False
) -> MessageReader:
    return MessageReader(
        field_messages=keys.field_messages,
        mappings=message_mappings(keys),
        roles=keys.roles,
        roles_to_train=keys.roles_to_train,
        message_field_training=keys.message_field_training,
        drop_system_message=keys.drop_system_message,
        default_system_message=root.default_system_message,
        field_tools=keys.field_tools,
        content_chunks=content_chunks,
    )


class ChatTemplateStrategy:
    """One row → its rendered conversation and trainable spans."""

    def __init__(
        self, keys: ChatTemplateDatasetKeys, root: ChatTemplateKeys, template: str, tokenizer: Any
    ) -> None:
        self.template = template
        self.tokenizer = tokenizer
        self.template_variables = dict(root.chat_template_kwargs or {})
        self.renderer = TemplateRenderer(tokenizer, template, self.template_variables)
        self.read = message_reader(keys, root)
        eot_tokens = keys.eot_tokens or root.eot_tokens
        policies = Policies(
            eos=keys.train_on_eos,
            eot=keys.train_on_eot or keys.train_on_eos,
            reasoning=keys.train_on_reasoning,
            eot_strings=eot_tokens,
        )
        self.locate = TurnLocator(self.render, tokenizer.eos_token, tokenizer.bos_token, policies)
        if eot_tokens:
            trailer = self.locate.assistant_trailer()
            if trailer is not None and not any(s in trailer for s in eot_tokens):
                raise ConfigError(
                    [
                        Problem(
                            "datasets[].eot_tokens" if keys.eot_tokens else "eot_tokens",
                            f"none of {list(eot_tokens)} ends an assistant turn in this chat "
                            f"template, which writes {trailer.strip()!r} after each answer",
                            hint="list the template's own end-of-turn string, or remove "
                            "eot_tokens to train whatever the template writes",
                        )
                    ]
                )

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Any,
        generation_prompt: bool,
        variables: dict[str, str],
    ) -> str:
        try:
            return self.renderer(messages, tools, generation_prompt, variables)
        except Exception as exc:  # jinja raises TemplateError, and templates raise_exception(...)
            raise RowError(
                "template error", f"the chat template failed: {exc}", key="chat_template"
            ) from None

    def __call__(self, row: dict[str, Any]) -> Rendered:
        conversation = self.read(row)
        return self.locate(conversation.messages, conversation.trained, conversation.tools)


def make_strategy(
    ds: DatasetConfig, tokenizer: Any, config: Config
) -> Callable[[dict[str, Any]], Sample]:
    keys = ds.section(ChatTemplateDatasetKeys)
    root = config.section(ChatTemplateKeys)
    if is_mistral_common(tokenizer):
        reader = message_reader(keys, root, content_chunks=True)
        return MistralChatStrategy(reader, tokenizer, keys.train_on_eos)
    if keys.chat_template or keys.chat_template_jinja:
        template = resolve_template(
            keys.chat_template, keys.chat_template_jinja, tokenizer, "datasets[].chat_template"
        )
    else:
        template = resolve_template(
            root.chat_template, root.chat_template_jinja, tokenizer, "chat_template"
        )
    return ChatTemplateStrategy(keys, root, template, tokenizer)
