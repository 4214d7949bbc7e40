"""`type = "chat_template"`: conversations rendered with a chat template, labels by turn.

Masking is derived from the rendered text itself. For each message the plugin renders the
conversation up to it (with the generation prompt for assistant turns) and up to and including
it; when both are prefixes of the full rendering, the message occupies exactly the text between
them. Templates whose rendering of a turn depends on later turns (system folded into the last
user turn, reasoning dropped from earlier turns) fall back to an anchored, ordered search. The
core then tokenises the full text once, with offsets, and trains the tokens inside the spans.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from sft import hookimpl
from sft.components import ConfigKeys, PromptStrategy
from sft.config.schema import key
from sft.data.sample import Rendered, RowError, Turn, merge_spans
from sft.errors import ConfigError, Problem

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = ("chatml", "llama3", "mistral", "gemma", "phi_3", "qwen")
EosPolicy = Literal["turn", "all", "last", "none"]

# End-of-turn strings of common templates; those present in a tokenizer mark turn ends.
KNOWN_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|eom_id|>", "</s>")
DEFAULT_ROLES = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "model"),
    "tool": ("tool", "observation", "function_response", "ipython"),
}


@attrs.frozen
class ChatTemplateKeys:
    chat_template: str | None = key(
        None,
        doc="Chat template for the tokenizer (saved with the model): tokenizer_default, "
        f"tokenizer_default_fallback_chatml, jinja, or a built-in: {', '.join(BUILTIN_TEMPLATES)}.",
    )
    chat_template_jinja: str | None = key(
        None, doc="With chat_template = 'jinja': the template text, or a path to a .jinja file."
    )
    default_system_message: str | None = key(
        None, doc="System message added to conversations that have none."
    )


@attrs.frozen
class ChatTemplateDatasetKeys:
    field_messages: str = key("messages", doc="Row field holding the list of messages.")
    message_property_mappings: dict[str, str] | None = key(
        None,
        doc="Message property → field in your data, e.g. {role = 'from', content = 'value'}.",
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
        None, doc="Strings that end a turn (default: EOS and the known end-of-turn tokens present)."
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
    chat_template_jinja: str | None = key(None, doc="This dataset's jinja template (text or path).")


def builtin_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(
    name: str | None, jinja: str | None, tokenizer: Any, path: str = "chat_template"
) -> str:
    """The template text a config selects; a clear error when there is none."""
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


class ConversationRenderer:
    """Renders one row's conversation and finds each turn's trainable span."""

    def __init__(
        self, keys: ChatTemplateDatasetKeys, root: ChatTemplateKeys, template: str, tokenizer: Any
    ):
        self.keys = keys
        self.root = root
        self.template = template
        self.tokenizer = tokenizer
        mappings = {"role": "role", "content": "content", **(keys.message_property_mappings or {})}
        self.role_field, self.content_field = mappings.pop("role"), mappings.pop("content")
        self.extra_mappings = mappings
        roles = keys.roles or DEFAULT_ROLES
        self.role_of = {source: target for target, sources in roles.items() for source in sources}
        for target in roles:
            self.role_of.setdefault(target, target)
        eos = tokenizer.eos_token
        if keys.eot_tokens:
            markers = list(keys.eot_tokens)
        else:
            vocabulary = set(tokenizer.get_vocab())
            markers = [t for t in KNOWN_END_OF_TURN if t in vocabulary]
            if eos and eos not in markers:
                markers.append(eos)
        self.markers = markers
        self.eos = eos
        self.eot_policy = keys.train_on_eot or keys.train_on_eos

    # -- messages ----------------------------------------------------------------------------

    def messages(self, row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[bool]]:
        field = self.keys.field_messages
        raw = row.get(field)
        if raw is None:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise RowError(
                "missing field", f"missing field {field!r} (fields present: {present})", field
            )
        if not isinstance(raw, list):
            raise RowError("wrong type", f"field {field!r} should be a list of messages", field)
        messages: list[dict[str, Any]] = []
        train_flags: list[bool] = []
        for index, message in enumerate(raw):
            where = f"{field}[{index}]"
            if not isinstance(message, dict):
                raise RowError("wrong type", f"{where} should be an object", where)
            source_role = message.get(self.role_field)
            if source_role is None:
                raise RowError(
                    "missing field",
                    f"{where} has no {self.role_field!r}",
                    f"{where}.{self.role_field}",
                )
            role = self.role_of.get(str(source_role))
            if role is None:
                known = ", ".join(sorted(self.role_of))
                raise RowError(
                    "unknown role",
                    f"{where}: unknown role {source_role!r} (known: {known}); map it with roles = "
                    "{target = ['" + str(source_role) + "']}",
                    f"{where}.{self.role_field}",
                )
            content = message.get(self.content_field)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise RowError(
                    "wrong type",
                    f"{where}.{self.content_field} should be a string, found {type(content).__name__}",
                    f"{where}.{self.content_field}",
                )
            if role == "system" and self.keys.drop_system_message:
                continue
            rendered: dict[str, Any] = {"role": role, "content": content}
            for target, source in self.extra_mappings.items():
                if source in message:
                    rendered[target] = message[source]
            for extra in ("tool_calls", "name", "tool_call_id", "reasoning_content"):
                if extra in message and extra not in rendered:
                    rendered[extra] = message[extra]
            messages.append(rendered)
            train_flags.append(self._trainable(role, message))
        if self.root.default_system_message and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.root.default_system_message})
            train_flags.insert(0, "system" in self.keys.roles_to_train)
        if not messages:
            raise RowError("empty conversation", f"{field} has no messages", field)
        return messages, train_flags

    def _trainable(self, role: str, message: dict[str, Any]) -> bool:
        flag_field = self.keys.message_field_training
        if flag_field and flag_field in message and message[flag_field] is not None:
            value = message[flag_field]
            if not isinstance(value, (bool, int)):
                raise RowError(
                    "wrong type", f"message field {flag_field!r} should be true/false", flag_field
                )
            return bool(value)
        return role in self.keys.roles_to_train

    def tools(self, row: dict[str, Any]) -> list[Any] | None:
        value = row.get(self.keys.field_tools)
        if value is None or value == "" or value == []:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowError(
                    "invalid tools",
                    f"field {self.keys.field_tools!r} is not valid JSON: {exc.msg}",
                    self.keys.field_tools,
                ) from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise RowError(
                "wrong type",
                f"field {self.keys.field_tools!r} should be a list of tools",
                self.keys.field_tools,
            )
        return value

    # -- rendering ---------------------------------------------------------------------------

    def render_text(
        self, messages: Sequence[dict[str, Any]], tools: Any, generation_prompt: bool
    ) -> str:
        try:
            return str(
                self.tokenizer.apply_chat_template(
                    list(messages),
                    tools=tools,
                    chat_template=self.template,
                    tokenize=False,
                    add_generation_prompt=generation_prompt,
                )
            )
        except Exception as exc:  # jinja raises TemplateError, and templates raise_exception(...)
            raise RowError("template error", f"the chat template failed: {exc}") from None

    def _prefix(
        self, messages: Sequence[dict[str, Any]], tools: Any, generation_prompt: bool
    ) -> str | None:
        try:
            return self.render_text(messages, tools, generation_prompt)
        except RowError:
            return None  # e.g. a template that refuses a conversation ending on a user turn

    def _find_marker(self, text: str, start: int, stop: int) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for marker in self.markers:
            position = text.find(marker, start, stop)
            if position != -1 and (best is None or position < best[0]):
                best = (position, position + len(marker))
        return best

    def __call__(self, row: dict[str, Any]) -> Rendered:
        messages, flags = self.messages(row)
        tools = self.tools(row)
        text = self.render_text(messages, tools, generation_prompt=False)
        turns: list[Turn] = []
        cursor = 0
        for index, message in enumerate(messages):
            if not flags[index]:
                continue  # only trained turns need locating; "all" markers are found by scanning
            turn = self._locate(text, messages, index, tools, cursor, flags[index])
            if turn is None:
                if flags[index]:
                    raise RowError(
                        "template error",
                        f"message {index} ({message['role']}) was not found in the rendered "
                        "conversation; the template may drop or rewrite it",
                    )
                continue
            turns.append(turn)
            cursor = turn.end_marker[1] if turn.end_marker else turn.end
        return Rendered(text=text, spans=self._spans(text, turns), turns=tuple(turns))

    def _locate(
        self,
        text: str,
        messages: list[dict[str, Any]],
        index: int,
        tools: Any,
        cursor: int,
        trainable: bool,
    ) -> Turn | None:
        message = messages[index]
        role = message["role"]
        content = message["content"].strip()
        assistant = role == "assistant"
        before = (
            self._prefix(messages[:index], tools, generation_prompt=assistant) if index else None
        )
        last = index == len(messages) - 1
        through = (
            text if last else self._prefix(messages[: index + 1], tools, generation_prompt=False)
        )
        if (
            before is not None
            and through is not None
            and len(through) > len(before) >= cursor
            and text.startswith(before)
            and text.startswith(through)
        ):
            start, stop = len(before), len(through)
            exact = True
        else:
            start, stop = self._search(text, messages, index, tools, cursor)
            if start < 0:
                return None
            exact = False
        found = text.find(content, start, stop) if content else -1
        # Text before the content is a header unless the model generates it: a user or system
        # header, or the role line of a template without a generation prompt. (Reasoning
        # written before an assistant's content, after a real generation prompt, stays trained.)
        if (
            found != -1
            and text[start:found].strip()
            and (not assistant or before == self._prefix(messages[:index], tools, False))
        ):
            start = found
        content_end = start
        if content:
            found = text.find(content, start, stop)
            if found != -1:
                content_end = found + len(content)
        marker = self._find_marker(text, content_end, stop)
        if marker and not exact and not assistant and text[content_end : marker[0]].strip():
            marker = None  # found by search: only a marker right after the content ends this turn
        end = marker[0] if marker else (content_end if content else stop)
        if marker is None and not content:
            end = len(text[:stop].rstrip()) if stop > start else start
        return Turn(
            role=role, start=start, end=max(start, end), trainable=trainable, end_marker=marker
        )

    def _search(
        self, text: str, messages: list[dict[str, Any]], index: int, tools: Any, cursor: int
    ) -> tuple[int, int]:
        """Fallback: find the turn after `cursor`, anchored on the template text before it.

        The anchor is what the template writes between the previous message's content and this
        turn (e.g. `[/INST]`, or the generation prompt), taken from a prefix rendering.
        """
        message = messages[index]
        content = message["content"].strip()
        anchor = ""
        if index:
            before = self._prefix(messages[:index], tools, message["role"] == "assistant")
            previous = messages[index - 1]["content"].strip()
            if before:
                position = before.rfind(previous) if previous else -1
                anchor = before[position + len(previous) :] if position != -1 else ""
        position = text.find(anchor, cursor) if anchor else -1
        while position != -1:
            start = position + len(anchor)
            found = text.find(content, start) if content else start
            if found != -1 and not text[start:found].strip():
                marker = self._find_marker(text, found + len(content), len(text))
                return start, (marker[1] if marker else len(text))
            position = text.find(anchor, position + 1)
        if content:
            found = text.find(content, cursor)
            if found != -1:
                marker = self._find_marker(text, found + len(content), len(text))
                return found, (marker[1] if marker else len(text))
        return -1, -1

    def _spans(self, text: str, turns: list[Turn]) -> tuple[tuple[int, int], ...]:
        spans = [(t.start, t.end) for t in turns if t.trainable]
        trained = [t for t in turns if t.trainable]
        last = trained[-1] if trained else None
        for turn in turns:
            if turn.end_marker is None:
                continue
            marker_text = text[turn.end_marker[0] : turn.end_marker[1]]
            policy = self.keys.train_on_eos if marker_text == self.eos else self.eot_policy
            if (
                (policy == "turn" and turn.trainable)
                or (policy == "last" and turn is last)
                or policy == "all"
            ):
                spans.append(turn.end_marker)
        for policy, strings in (
            (self.keys.train_on_eos, [self.eos] if self.eos else []),
            (self.eot_policy, [m for m in self.markers if m != self.eos]),
        ):
            if policy != "all":
                continue
            for marker in strings:
                position = text.find(marker)
                while position != -1:
                    spans.append((position, position + len(marker)))
                    position = text.find(marker, position + len(marker))
        return merge_spans(spans)


def _factory(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Rendered]:
    keys = ds.section(ChatTemplateDatasetKeys)
    root = config.section(ChatTemplateKeys)
    if keys.chat_template or keys.chat_template_jinja:
        template = resolve_template(
            keys.chat_template, keys.chat_template_jinja, tokenizer, "datasets[].chat_template"
        )
    else:
        template = resolve_template(root.chat_template, root.chat_template_jinja, tokenizer)
    return ConversationRenderer(keys, root, template, tokenizer)


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
    return problems


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
    return problems


@hookimpl
def sft_prepare_tokenizer(tokenizer: Any, config: Any) -> None:
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
