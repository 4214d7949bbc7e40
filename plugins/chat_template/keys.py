"""The chat_template plugin's config keys: the top-level ones and each dataset's."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from sft.config.schema import key
from sft.errors import Problem
from sft.plugins.chat_template.templates import BUILTIN_TEMPLATES

EosPolicy = Literal["turn", "all", "last", "none"]


@attrs.frozen
class ChatTemplateKeys:
    chat_template: str | None = key(
        None,
        doc="Chat template for the tokenizer (saved with the model): tokenizer_default, "
        f"tokenizer_default_fallback_chatml, jinja, or a built-in: {', '.join(BUILTIN_TEMPLATES)}.",
    )
    chat_template_jinja: str | None = key(
        None,
        doc="With chat_template = 'jinja': the template text, or a path to a .jinja file.",
        path=True,
    )
    default_system_message: str | None = key(
        None, doc="System message added to conversations that have none."
    )
    chat_template_kwargs: dict[str, Any] | None = key(
        None,
        doc="Extra variables for the chat template, e.g. {enable_thinking = false} (Qwen3): used "
        "when rendering the training data, and by `sft chat` on the result.",
    )
    eot_tokens: tuple[str, ...] | None = key(
        None,
        doc="End-of-turn markers to train, for every chat_template dataset that sets none of its "
        "own (default: whatever the template writes after each turn's content).",
    )


@attrs.frozen
class ChatTemplateDatasetKeys:
    field_messages: str = key("messages", doc="Row field holding the list of messages.")
    message_property_mappings: dict[str, str] | None = key(
        None,
        doc="Message property → field in your data, e.g. {role = 'from', content = 'value'}.",
    )
    message_field_role: str | None = key(
        None, doc="Axolotl's older spelling of message_property_mappings = {role = '...'}."
    )
    message_field_content: str | None = key(
        None, doc="Axolotl's older spelling of message_property_mappings = {content = '...'}."
    )
    field_thinking: str | None = key(
        None,
        doc="Message field holding the reasoning, when it is not reasoning_content (Axolotl's "
        "key; = message_property_mappings = {<template_thinking_key> = '...'}).",
    )
    template_thinking_key: Literal["reasoning_content", "thinking", "reasoning"] | None = key(
        None,
        doc="Name the chat template reads the reasoning under (default reasoning_content).",
    )
    roles: dict[str, tuple[str, ...]] | None = key(
        None,
        doc="Template role → the role names used in your data, e.g. {user = ['human'], "
        "assistant = ['gpt']}. Default maps human/gpt/observation too.",
    )
    roles_to_train: tuple[str, ...] = key(("assistant",), doc="Roles whose turns are trained.")
    train_on_eos: EosPolicy = key(
        "turn",
        doc="Train the EOS token after: each trained turn (turn), every turn (all), the last "
        "trained turn (last), or never (none). Without it the model never learns to stop.",
    )
    train_on_eot: EosPolicy | None = key(
        None,
        doc="As train_on_eos, for end-of-turn tokens that are not EOS (default: as train_on_eos).",
    )
    eot_tokens: tuple[str, ...] | None = key(
        None,
        doc="End-of-turn markers to train (default: whatever the template writes after each "
        "turn's content, e.g. <|im_end|>); with this set, only these strings are.",
    )
    train_on_reasoning: bool = key(
        True,
        doc="Train the reasoning an assistant turn renders before its answer (<think>...</think>); "
        "false masks it. Reasoning the template drops from a turn is never trained.",
    )
    message_field_training: str | None = key(
        None, doc="Per-message boolean field that overrides roles_to_train for that message."
    )
    drop_system_message: bool = key(False, doc="Remove system messages before rendering.")
    field_tools: str = key(
        "tools", doc="Row field with tool definitions (a list, or a JSON string)."
    )
    chat_template: str | None = key(
        None, doc="This dataset's chat template, when it differs from the top-level one."
    )
    chat_template_jinja: str | None = key(
        None, doc="This dataset's jinja template (text or path).", path=True
    )


def message_mappings(keys: ChatTemplateDatasetKeys) -> dict[str, str] | None:
    """message_property_mappings with Axolotl's single-field keys folded in (checked at
    validate not to conflict with it)."""
    mappings = dict(keys.message_property_mappings or {})
    if keys.message_field_role:
        mappings.setdefault("role", keys.message_field_role)
    if keys.message_field_content:
        mappings.setdefault("content", keys.message_field_content)
    target = keys.template_thinking_key or "reasoning_content"
    source = keys.field_thinking or "reasoning_content"
    if source != target:
        mappings.setdefault(target, source)
    return mappings or None


def mapping_problems(keys: ChatTemplateDatasetKeys, where: str) -> list[Problem]:
    given = keys.message_property_mappings or {}
    target = keys.template_thinking_key or "reasoning_content"
    pairs = (
        ("message_field_role", keys.message_field_role, "role"),
        ("message_field_content", keys.message_field_content, "content"),
        ("field_thinking", keys.field_thinking, target),
    )
    return [
        Problem(
            f"{where}.{name}",
            f"conflicts with message_property_mappings.{prop}: set the field once",
            hint=f"remove {name}",
        )
        for name, value, prop in pairs
        if value and prop in given and given[prop] != value
    ]
