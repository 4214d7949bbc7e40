"""`type = "chat_template"`: conversations rendered with a chat template, labels by turn.

Labels come from the template's own renderings, never from a list of marker strings: see
`layout.py` for how each turn's generated text and end-of-turn marker are located, and
`messages.py` for how a row becomes the messages the template sees. The core then tokenises the
full text once, with offsets, and trains the tokens inside the spans.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, PromptStrategy
from sft.config.schema import key
from sft.data.sample import Rendered, RowError, Sample
from sft.errors import ConfigError, Problem
from sft.plugins.chat_template.layout import Policies, TurnLocator
from sft.plugins.chat_template.messages import MessageReader
from sft.plugins.chat_template.mistral import MistralChatStrategy, is_mistral_common

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = (
    "chatml",
    "llama3",
    "mistral",
    "gemma",
    "phi_3",
    "qwen",
    # Axolotl's names for models' own templates (the files copied verbatim from Axolotl)
    "cohere",
    "deepseek_v2",
    "deepseek_v3",
    "falcon_h1",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "jamba",
    "llama4",
    "qwen3",
    "qwen3_5",
)
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


def builtin_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def syntax_problem(template: str) -> str | None:
    """The template's Jinja syntax error ("line N: message"), or None when it parses.

    Parsed as transformers compiles chat templates: a sandboxed environment with
    `trim_blocks`/`lstrip_blocks`, loop controls and the `{% generation %}` tag.
    """
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        tags = {"generation"}  # noqa: RUF012 (jinja's own declaration style)

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> Any:
            return caller()

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    try:
        environment.parse(template)
    except jinja2.TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


def resolve_template(
    name: str | None, jinja: str | None, tokenizer: Any, path: str = "chat_template"
) -> str:
    """The template text a config selects; a clear error when there is none or it is broken."""
    template = _select_template(name, jinja, tokenizer, path)
    if error := syntax_problem(template):
        where = f"{path}_jinja" if jinja else path
        raise ConfigError(
            [Problem(where, f"the chat template is not valid Jinja ({error})", hint=SYNTAX_HINT)]
        )
    return template


SYNTAX_HINT = "fix the template (Jinja syntax: {{ ... }}, {% ... %}, every block closed)"


def _select_template(name: str | None, jinja: str | None, tokenizer: Any, path: str) -> str:
    if jinja and not name:
        name = "jinja"
    if name == "jinja":
        if not jinja:
            raise ConfigError(
                [Problem(f"{path}_jinja", "chat_template = 'jinja' needs chat_template_jinja")]
            )
        if "{" in jinja:
            return jinja  # the template itself
        candidate = Path(jinja).expanduser()
        if not candidate.is_file():
            raise ConfigError(
                [
                    Problem(
                        f"{path}_jinja",
                        f"template file not found: {jinja}",
                        hint="give a path to a .jinja file, or the template text itself",
                    )
                ]
            )
        return candidate.read_text(encoding="utf-8")
    if name in BUILTIN_TEMPLATES:
        return builtin_template(name)
    if name in (None, "tokenizer_default", "tokenizer_default_fallback_chatml"):
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            return str(template)
        if name == "tokenizer_default_fallback_chatml":
            return builtin_template("chatml")
        raise ConfigError(
            [
                Problem(
                    path,
                    "the tokenizer has no chat template and none is configured",
                    hint="set chat_template = 'chatml' (or another built-in: "
                    f"{', '.join(BUILTIN_TEMPLATES)}), or chat_template = 'jinja' with chat_template_jinja",
                )
            ]
        )
    raise ConfigError(
        [
            Problem(
                path,
                f"unknown chat template {name!r}; built-ins: {', '.join(BUILTIN_TEMPLATES)}, or 'jinja'",
            )
        ]
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


def _mapping_problems(keys: ChatTemplateDatasetKeys, where: str) -> list[Problem]:
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


def _reader(
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
        self.read = _reader(keys, root)
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
            return str(
                self.tokenizer.apply_chat_template(
                    list(messages),
                    tools=tools,
                    chat_template=self.template,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                    **variables,
                )
            )
        except Exception as exc:  # jinja raises TemplateError, and templates raise_exception(...)
            raise RowError(
                "template error", f"the chat template failed: {exc}", key="chat_template"
            ) from None

    def __call__(self, row: dict[str, Any]) -> Rendered:
        conversation = self.read(row)
        return self.locate(conversation.messages, conversation.trained, conversation.tools)


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Sample]:
    keys = ds.section(ChatTemplateDatasetKeys)
    root = config.section(ChatTemplateKeys)
    if is_mistral_common(tokenizer):
        reader = _reader(keys, root, content_chunks=True)
        return MistralChatStrategy(reader, tokenizer, keys.train_on_eos)
    if keys.chat_template or keys.chat_template_jinja:
        template = resolve_template(
            keys.chat_template, keys.chat_template_jinja, tokenizer, "datasets[].chat_template"
        )
    else:
        template = resolve_template(root.chat_template, root.chat_template_jinja, tokenizer)
    return ChatTemplateStrategy(keys, root, template, tokenizer)


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(ChatTemplateKeys), ConfigKeys(ChatTemplateDatasetKeys, scope="dataset")]


KNOWN_NAMES = (
    *BUILTIN_TEMPLATES,
    "tokenizer_default",
    "tokenizer_default_fallback_chatml",
    "jinja",
)


def _template_problems(name: str | None, jinja: str | None, path: str) -> list[Problem]:
    problems = []
    if name is not None and name not in KNOWN_NAMES:
        from sft.registry import did_you_mean

        guess = did_you_mean(name, KNOWN_NAMES)
        problems.append(
            Problem(
                path,
                f"unknown chat template {name!r}" + (f"; did you mean {guess!r}?" if guess else ""),
                hint=f"one of {', '.join(KNOWN_NAMES)}",
            )
        )
    if name == "jinja" and not jinja:
        problems.append(
            Problem(
                path,
                "chat_template = 'jinja' needs chat_template_jinja (the template text or a file)",
            )
        )
    if jinja and "{" not in jinja and not Path(jinja).expanduser().is_file():
        problems.append(
            Problem(
                f"{path}_jinja",
                f"template file not found: {jinja}",
                hint="give a path to a .jinja file, or the template text itself",
            )
        )
    elif jinja and name in (None, "jinja"):
        text = jinja if "{" in jinja else _read_text(Path(jinja).expanduser())
        if text is not None and (error := syntax_problem(text)):
            problems.append(
                Problem(
                    f"{path}_jinja",
                    f"the chat template is not valid Jinja ({error})",
                    hint=SYNTAX_HINT,
                )
            )
    return problems


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


@hookimpl
def sft_validate_config(config: Any) -> list[Problem]:
    root = config.section(ChatTemplateKeys)
    problems = _template_problems(root.chat_template, root.chat_template_jinja, "chat_template")
    for group in ("datasets", "test_datasets"):
        for index, ds in enumerate(getattr(config, group)):
            keys = ds.section(ChatTemplateDatasetKeys)
            problems += _template_problems(
                keys.chat_template, keys.chat_template_jinja, f"{group}[{index}].chat_template"
            )
            problems += _mapping_problems(keys, f"{group}[{index}]")
    if config.tokenizer_use_mistral_common:
        problems += _mistral_common_problems(config)
    datasets = [*config.datasets, *config.test_datasets]
    if root.default_system_message and not any(ds.type == "chat_template" for ds in datasets):
        problems.append(
            Problem(
                "default_system_message",
                "has no effect: no dataset has type = 'chat_template' (it is added to the "
                "conversations of those)",
                hint="remove default_system_message, or use a chat_template dataset",
                warning=True,
            )
        )
    if root.eot_tokens and not any(
        ds.type == "chat_template" and not ds.section(ChatTemplateDatasetKeys).eot_tokens
        for ds in datasets
    ):
        problems.append(
            Problem(
                "eot_tokens",
                "has no effect: it applies to chat_template datasets that set no eot_tokens of "
                "their own, and there is none",
                hint="remove the top-level eot_tokens",
                warning=True,
            )
        )
    return problems


def _mistral_common_problems(config: Any) -> list[Problem]:
    """What a mistral-common tokenizer cannot do: it has no Jinja template (conversations are
    encoded by the library), it tokenizes text without character offsets (so only
    chat_template datasets can be labelled), and it finds only assistant turns."""
    root = config.section(ChatTemplateKeys)
    why = "with tokenizer_use_mistral_common, mistral-common encodes the conversation itself"
    problems = [
        Problem(name, f"has no effect {why}", hint=f"remove {name}")
        for name in ("chat_template", "chat_template_jinja")
        if getattr(root, name) not in (None, "tokenizer_default")
    ]
    for group in ("datasets", "test_datasets"):
        for index, ds in enumerate(getattr(config, group)):
            where = f"{group}[{index}]"
            if ds.type != "chat_template":
                problems.append(
                    Problem(
                        f"{where}.type",
                        f"{ds.type!r} renders text, and a mistral-common tokenizer cannot map "
                        "tokens back to text to label them",
                        hint="use type = 'chat_template' (conversations), or remove "
                        "tokenizer_use_mistral_common",
                    )
                )
                continue
            keys = ds.section(ChatTemplateDatasetKeys)
            problems += [
                Problem(f"{where}.{name}", f"has no effect {why}", hint=f"remove {name}")
                for name in ("chat_template", "chat_template_jinja", "eot_tokens", "train_on_eot")
                if getattr(keys, name)
            ]
            if set(keys.roles_to_train) - {"assistant"}:
                problems.append(
                    Problem(
                        f"{where}.roles_to_train",
                        "with a mistral-common tokenizer only assistant turns can be trained",
                        hint="roles_to_train = ['assistant']",
                    )
                )
            if not keys.train_on_reasoning:
                problems.append(
                    Problem(
                        f"{where}.train_on_reasoning",
                        "false is not supported with a mistral-common tokenizer (its reasoning "
                        "and answer tokens are told apart by the library only)",
                        hint="remove train_on_reasoning",
                    )
                )
    return problems


@hookimpl
def sft_prepare_tokenizer(tokenizer: Any, config: Any) -> None:
    if is_mistral_common(tokenizer):
        return  # mistral-common encodes conversations itself (no Jinja template)
    root = config.section(ChatTemplateKeys)
    if root.chat_template not in (None, "tokenizer_default") or root.chat_template_jinja:
        tokenizer.chat_template = resolve_template(
            root.chat_template, root.chat_template_jinja, tokenizer
        )


@hookimpl
def sft_register_prompt_strategies(register: Callable[[PromptStrategy], None]) -> None:
    register(
        PromptStrategy(
            "chat_template",
            _factory,
            "conversations (OpenAI messages, ShareGPT via roles + message_property_mappings), "
            "rendered with a chat template; trains the turns of roles_to_train",
        )
    )
