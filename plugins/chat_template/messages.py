"""A row's conversation as the chat template expects it: roles mapped, fields checked.

Everything a row can get wrong is a `RowError` naming the message and field: a missing
role or content field (a `message_property_mappings` typo makes every row fail this way, which
the core then reports as one config error on that key), an unknown role, content that is not a
string, tool-call arguments that are not valid JSON.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from sft.data.sample import RowError

DEFAULT_ROLES = {
    "system": ("system",),
    "user": ("user", "human"),
    "assistant": ("assistant", "gpt", "model"),
    "tool": ("tool", "observation", "function_response", "ipython"),
}
# Message fields passed to the template as they are (transformers also reads `thinking` and
# `reasoning` as `reasoning_content`).
PASSED_THROUGH = ("name", "tool_call_id", "reasoning_content", "thinking", "reasoning")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
MAPPINGS_KEY = "message_property_mappings"


@attrs.frozen
class Conversation:
    """The messages to render, and which of them are trained."""

    messages: list[dict[str, Any]]
    trained: list[bool]
    tools: list[Any] | None


class MessageReader:
    """Reads `field_messages` of a row into template messages."""

    def __init__(
        self,
        field_messages: str,
        mappings: dict[str, str] | None,
        roles: dict[str, tuple[str, ...]] | None,
        roles_to_train: tuple[str, ...],
        message_field_training: str | None,
        drop_system_message: bool,
        default_system_message: str | None,
        field_tools: str,
        content_chunks: bool = False,
    ) -> None:
        self.field_messages = field_messages
        # content as a list of typed chunks ({"type": "text", "text": ...}, {"type": "thinking",
        # ...}): passed through for encoders that read them (mistral-common)
        self.content_chunks = content_chunks
        merged = {"role": "role", "content": "content", **(mappings or {})}
        self.role_field = merged.pop("role")
        self.content_field = merged.pop("content")
        self.content_mapped = bool(mappings and "content" in mappings)
        self.extra_mappings = merged
        self.role_of = {
            source: target
            for target, sources in (roles or DEFAULT_ROLES).items()
            for source in sources
        }
        for target in roles or DEFAULT_ROLES:
            self.role_of.setdefault(target, target)
        self.roles_to_train = roles_to_train
        self.message_field_training = message_field_training
        self.drop_system_message = drop_system_message
        self.default_system_message = default_system_message
        self.field_tools = field_tools

    def __call__(self, row: dict[str, Any]) -> Conversation:
        raw = row.get(self.field_messages)
        if raw is None:
            present = ", ".join(sorted(map(str, row))) or "none"
            raise RowError(
                "missing field",
                f"missing field {self.field_messages!r} (fields present: {present})",
                self.field_messages,
                key="field_messages",
            )
        if not isinstance(raw, list):
            raise RowError(
                "wrong type",
                f"field {self.field_messages!r} should be a list of messages",
                self.field_messages,
            )
        messages: list[dict[str, Any]] = []
        trained: list[bool] = []
        for index, message in enumerate(raw):
            where = f"{self.field_messages}[{index}]"
            if not isinstance(message, dict):
                raise RowError("wrong type", f"{where} should be an object", where)
            role = self._role(message, where)
            if role == "system" and self.drop_system_message:
                continue
            rendered: dict[str, Any] = {"role": role, "content": self._content(message, where)}
            for target, source in self.extra_mappings.items():
                if source in message:
                    rendered[target] = message[source]
            for extra in PASSED_THROUGH:
                if message.get(extra) is not None and extra not in rendered:
                    rendered[extra] = message[extra]
            if message.get("tool_calls") is not None:
                rendered["tool_calls"] = _tool_calls(message["tool_calls"], where)
            messages.append(rendered)
            trained.append(self._trainable(role, message))
        if self.default_system_message and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": self.default_system_message})
            trained.insert(0, "system" in self.roles_to_train)
        if not messages:
            raise RowError(
                "empty conversation", f"{self.field_messages} has no messages", self.field_messages
            )
        return Conversation(messages, trained, self._tools(row))

    def _role(self, message: dict[str, Any], where: str) -> str:
        source_role = message.get(self.role_field)
        if source_role is None:
            present = ", ".join(sorted(map(str, message))) or "none"
            raise RowError(
                "missing field",
                f"{where} has no {self.role_field!r} field (fields present: {present})",
                f"{where}.{self.role_field}",
                key=MAPPINGS_KEY,
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
        return role

    def _content(self, message: dict[str, Any], where: str) -> Any:
        """The message text. Absent or null only in a message that calls tools instead."""
        content = message.get(self.content_field)
        if content is None:
            if message.get("tool_calls"):
                return ""
            present = ", ".join(sorted(map(str, message))) or "none"
            how = (
                f"message_property_mappings maps content to {self.content_field!r}"
                if self.content_mapped
                else "map your content field with message_property_mappings = {content = '...'}"
            )
            raise RowError(
                "missing field",
                f"{where} has no {self.content_field!r} field (fields present: {present}); {how}",
                f"{where}.{self.content_field}",
                key=MAPPINGS_KEY,
            )
        if self.content_chunks and isinstance(content, list):
            for index, chunk in enumerate(content):
                if not isinstance(chunk, dict) or not isinstance(chunk.get("type"), str):
                    raise RowError(
                        "wrong type",
                        f"{where}.{self.content_field}[{index}] should be a chunk object with a "
                        "'type' (e.g. {'type': 'text', 'text': '...'})",
                        f"{where}.{self.content_field}",
                    )
            return content
        if not isinstance(content, str):
            expected = "a string or a list of chunks" if self.content_chunks else "a string"
            raise RowError(
                "wrong type",
                f"{where}.{self.content_field} should be {expected}, found "
                f"{type(content).__name__}",
                f"{where}.{self.content_field}",
            )
        return content

    def _trainable(self, role: str, message: dict[str, Any]) -> bool:
        flag_field = self.message_field_training
        if flag_field and message.get(flag_field) is not None:
            value = message[flag_field]
            if not isinstance(value, (bool, int)):
                raise RowError(
                    "wrong type", f"message field {flag_field!r} should be true/false", flag_field
                )
            return bool(value)
        return role in self.roles_to_train

    def _tools(self, row: dict[str, Any]) -> list[Any] | None:
        value = row.get(self.field_tools)
        if value is None or value == "" or value == []:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise RowError(
                    "invalid tools",
                    f"field {self.field_tools!r} is not valid JSON: {exc.msg}",
                    self.field_tools,
                ) from None
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            raise RowError(
                "wrong type",
                f"field {self.field_tools!r} should be a list of tools",
                self.field_tools,
            )
        return value


def _tool_calls(value: Any, where: str) -> list[Any]:
    """OpenAI-format tool calls with their `arguments` as objects.

    OpenAI's API gives `function.arguments` as a JSON *string*; chat templates write
    `arguments | tojson`, which would encode that string a second time. Strings are parsed here
    (a copy: the row is not changed); an argument string that is not JSON is a row error.
    """
    if not isinstance(value, list):
        raise RowError(
            "wrong type", f"{where}.tool_calls should be a list of calls", f"{where}.tool_calls"
        )
    calls = []
    for number, call in enumerate(value):
        here = f"{where}.tool_calls[{number}]"
        if not isinstance(call, dict):
            raise RowError("wrong type", f"{here} should be an object", here)
        call = dict(call)
        if isinstance(call.get("function"), dict):
            function = dict(call["function"])
            function["arguments"] = _arguments(function.get("arguments"), f"{here}.function")
            call["function"] = function
        elif "arguments" in call:
            call["arguments"] = _arguments(call["arguments"], here)
        calls.append(call)
    return calls


def _arguments(value: Any, where: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as exc:
        raise RowError(
            "invalid tool call",
            f"{where}.arguments is a string but not valid JSON ({exc.msg} at column {exc.colno}): "
            f"{value[:60]!r}",
            f"{where}.arguments",
        ) from None


def split_reasoning(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning written inside `content` up to and including `</think>`, the visible rest)."""
    content = message["content"]
    end = content.find("</think>")
    if end == -1:
        return "", content
    cut = end + len("</think>")
    return content[:cut], content[cut:]


def has_reasoning(message: dict[str, Any]) -> bool:
    if any(message.get(field) for field in REASONING_FIELDS):
        return True
    return bool(split_reasoning(message)[0])
