"""Conversations tokenized by Mistral's own library (`tokenizer_use_mistral_common = true`).

A mistral-common tokenizer has no Jinja template: `mistral_common` encodes a conversation
straight to token ids, and it never reads control tokens (`[INST]`, `</s>`) out of text, so the
text-and-offsets path of the other templates cannot be used. Labels are found on the ids:

- The whole conversation is encoded as a fine-tuning request (it ends on an assistant turn, and
  each assistant turn ends with EOS).
- For assistant turn k, the conversation up to the message before it is encoded as a prompt
  (it ends on the user or tool turn, as a generation request) and then up to turn k itself:
  what the longer one adds after the shared prefix is turn k's tokens (its text, tool calls and
  EOS), exactly as the library writes them.
- Those tokens are found in the whole conversation after the previous assistant turn, ending at
  the first EOS there. They usually differ from the full encoding's prefix (older Mistral
  formats move the system prompt to the last user turn), so they are matched, never assumed.

Messages after the last assistant turn train nothing and are left out (the library refuses a
fine-tuning request that does not end on an assistant turn).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sft.config.schema import Config
from sft.data.sample import IGNORE_INDEX, RowError, Tokenized
from sft.errors import Problem
from sft.plugins.chat_template.keys import ChatTemplateDatasetKeys, ChatTemplateKeys
from sft.plugins.chat_template.messages import REASONING_FIELDS, Conversation, MessageReader


def is_mistral_common(tokenizer: Any) -> bool:
    return type(tokenizer).__name__ == "MistralCommonBackend"


def finetuning_tokenizer(tokenizer: Any) -> Any:
    """The same mistral-common tokenizer, validating requests for fine-tuning (a conversation
    that ends on an assistant turn) rather than for generation."""
    return _finetuning_tokenizer(str(tokenizer.tokenizer.instruct_tokenizer.tokenizer.file_path))


@functools.lru_cache(maxsize=4)
def _finetuning_tokenizer(path: str) -> Any:
    """Loaded once per file and process (a Tekken file is tens of MB of JSON)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)


def _openai_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as mistral-common's OpenAI reader takes it: reasoning as a thinking chunk."""
    out = {k: v for k, v in message.items() if k not in REASONING_FIELDS}
    reasoning = next((message[k] for k in REASONING_FIELDS if message.get(k)), None)
    if reasoning:
        out["content"] = [
            {"type": "thinking", "thinking": reasoning},
            {"type": "text", "text": message.get("content") or ""},
        ]
    return out


class MistralChatStrategy:
    """One row → its token ids and labels, encoded by mistral-common."""

    def __init__(self, read: MessageReader, tokenizer: Any, train_on_eos: str) -> None:
        self.read = read
        self.prompts = tokenizer.tokenizer  # generation requests
        self.training = finetuning_tokenizer(tokenizer)
        self.eos = tokenizer.eos_token_id
        self.bos = tokenizer.bos_token_id
        self.train_on_eos = train_on_eos

    def _encode(self, encoder: Any, messages: Sequence[dict[str, Any]], tools: Any) -> list[int]:
        from mistral_common.exceptions import MistralCommonException
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        try:
            request = ChatCompletionRequest.from_openai(
                [_openai_message(m) for m in messages], tools=tools or None
            )
            return list(encoder.encode_chat_completion(request).tokens)
        except (MistralCommonException, ValueError, TypeError, KeyError) as exc:
            raise RowError(
                "template error", f"mistral-common cannot encode this conversation: {exc}"
            ) from None

    def __call__(self, row: dict[str, Any]) -> Tokenized:
        conversation: Conversation = self.read(row)
        messages, trained = conversation.messages, conversation.trained
        for message, is_trained in zip(messages, trained, strict=True):
            if is_trained and message["role"] != "assistant":
                raise RowError(
                    "untrainable role",
                    f"a {message['role']} turn is to be trained, but with a mistral-common "
                    "tokenizer only assistant turns can be",
                    key="roles_to_train",
                )
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not assistants:
            raise RowError("no assistant turn", "the conversation has no assistant turn")
        messages = messages[: assistants[-1] + 1]
        ids = self._encode(self.training, messages, conversation.tools)
        labels = [IGNORE_INDEX] * len(ids)
        searched = 0
        for order, index in enumerate(assistants):
            turn = self._turn_tokens(messages, index, conversation.tools)
            end = self._locate(ids, turn, searched, index)
            searched = end
            if not trained[index]:
                continue
            last = order == len(assistants) - 1
            keep_eos = self.train_on_eos in ("turn", "all") or (
                self.train_on_eos == "last" and last
            )
            stop = end if keep_eos else end - 1  # the turn ends with EOS (see _locate)
            for position in range(end - len(turn), stop):
                labels[position] = ids[position]
        return Tokenized(input_ids=tuple(ids), labels=tuple(labels))

    def _turn_tokens(self, messages: list[dict[str, Any]], index: int, tools: Any) -> list[int]:
        through = self._encode(self.training, messages[: index + 1], tools)
        if index == 0:
            return through[1:] if through[:1] == [self.bos] else through
        prompt = self._encode(self.prompts, messages[:index], tools)
        if through[: len(prompt)] != prompt:
            raise RowError(
                "template error",
                f"message {index}: mistral-common writes the conversation before this "
                "assistant turn differently once the turn follows, so the turn cannot be told "
                "apart",
            )
        return through[len(prompt) :]

    def _locate(self, ids: list[int], turn: list[int], start: int, index: int) -> int:
        """The end of `turn` in `ids`: at the first EOS from `start` on."""
        if not turn:
            raise RowError("template error", f"message {index}: the assistant turn is empty")
        for end in range(start + len(turn), len(ids) + 1):
            if ids[end - 1] == self.eos:
                if ids[end - len(turn) : end] == turn:
                    return end
                break
        raise RowError(
            "template error",
            f"message {index}: the assistant turn's tokens are not where mistral-common puts "
            "them in the whole conversation",
        )


def mistral_common_problems(config: Config) -> list[Problem]:
    """What a mistral-common tokenizer cannot do: it has no Jinja template (conversations are
    encoded by the library), it tokenizes text without character offsets (so only
    chat_template datasets can be labelled), and it finds only assistant turns."""
    root = config.section(ChatTemplateKeys)
    why = "with tokenizer_use_mistral_common, mistral-common encodes the conversation itself"
    problems = [
        Problem(name, f"has no effect {why}", hint=f"remove {name}")
        for name in ("chat_template", "chat_template_jinja", "chat_template_kwargs")
        if getattr(root, name) not in (None, "tokenizer_default")
    ]
    for where, ds in config.all_datasets():
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
