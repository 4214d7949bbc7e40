"""Where each message lies in a rendered conversation, read off the template's own renderings.

No list of marker strings and no tokenizer vocabulary is involved: every boundary comes from
rendering (parts of) the same conversation with the same template.

- **Turn end.** The conversation up to and including message k, rendered on its own, is a prefix
  of the full rendering (less the *closer*, below) for every template whose rendering of a turn
  does not depend on later turns; its length is where message k's turn ends.
- **Trailer and end marker.** What the template writes after a message's content to close the
  turn (`<|im_end|>\\n`, `<|eot_id|>`, `</s>`, `<|end|>\\n`) is read from a rendering in which
  that message is a bare sentinel. The trailer's non-blank part is the turn's *end marker*: one
  special token or several ordinary ones, it is found and trained the same way on every turn.
- **Generation start.** For an assistant turn, the conversation before it rendered with the
  generation prompt ends exactly where the model's own text starts (reasoning included).
- **Content.** The full conversation with message k's content replaced by a sentinel: the text
  around the sentinel is the text around k's content, in context. This locates content even when
  the template treats turns differently by position (Qwen3 keeps reasoning only after the last
  user message, DeepSeek-R1 drops it from every turn, Gemma folds the system message into the
  first user turn).
- **Closer.** Text a template writes once at the end of a conversation rather than after each
  turn (Phi-3 appends `eos_token`) is found once per template from two small probe renderings
  in which `eos_token`/`bos_token` are unique sentinels, so it is never mistaken for a turn's end.

When a template renders turns by position and the prefix renderings do not line up, the trailer
is searched right after the content located in context, and the generation prompt right
before it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft.data.sample import Rendered, RowError, Turn, merge_spans
from sft.plugins.chat_template.messages import REASONING_FIELDS, has_reasoning, split_reasoning

Span = tuple[int, int]
# Private-use characters: never whitespace (templates may trim), never in real text.
CONTENT_PROBE = "\ue000sft-content\ue001"
EOS_PROBE = "\ue000sft-eos\ue001"
BOS_PROBE = "\ue000sft-bos\ue001"
MAX_TRAILERS_PER_ROLE = 4

# render(messages, tools, generation_prompt, template variables) -> text; raises RowError.
RenderFn = Callable[[Sequence[dict[str, Any]], Any, bool, dict[str, str]], str]


@attrs.frozen
class Policies:
    """What to train besides the trained turns' text (the `train_on_*` dataset keys)."""

    eos: str  # train_on_eos: turn | all | last | none
    eot: str  # train_on_eot (end markers that are not the EOS token)
    reasoning: bool = True  # train_on_reasoning
    eot_strings: tuple[str, ...] | None = None  # eot_tokens: the end marker is one of these


@attrs.define
class _Located:
    index: int
    role: str
    start: int  # first trained character (generation start, or content start)
    content: Span | None  # the visible content, when located
    generated_end: int  # where the trailer (end-of-turn text) starts
    marker: Span | None
    reasoning_dropped: bool = False


def common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))  # noqa: RUF071 (strings, not paths)


class TurnLocator:
    """Finds the trainable spans of one conversation. One per dataset (caches template facts)."""

    def __init__(
        self, render: RenderFn, eos_token: str | None, bos_token: str | None, policies: Policies
    ) -> None:
        self.render = render
        self.eos = eos_token
        self.bos = bos_token
        self.policies = policies
        self.closer = self._find_closer()
        self.writes_generation_prompt = self._writes_generation_prompt()
        self.trailers: dict[str, list[str]] = {}

    # -- template facts (once per dataset) ----------------------------------------------------

    def _find_closer(self) -> str:
        """Text the template appends once after the last message (Phi-3: `eos_token`), or ""."""
        probes = {}
        if self.eos:
            probes["eos_token"] = EOS_PROBE
        if self.bos:
            probes["bos_token"] = BOS_PROBE
        first = [
            {"role": "user", "content": "\ue000a"},
            {"role": "assistant", "content": "\ue000b"},
        ]
        extended = [*first, {"role": "user", "content": "\ue000c"}]
        try:
            short = self.render(first, None, False, probes)
            longer = self.render(extended, None, False, probes)
        except RowError:
            return ""  # a template that refuses these shapes: rows show no closer either
        closer = short[common_prefix(short, longer) :]
        return closer.replace(EOS_PROBE, self.eos or "").replace(BOS_PROBE, self.bos or "")

    def assistant_trailer(self) -> str | None:
        """What the template writes after an assistant's content (in a plain exchange)."""
        exchange = [
            {"role": "user", "content": "\ue000a"},
            {"role": "assistant", "content": CONTENT_PROBE},
        ]
        try:
            rendered = self.render(exchange, None, False, {})
        except RowError:
            return None
        if rendered.count(CONTENT_PROBE) != 1:
            return None
        tail = rendered[rendered.index(CONTENT_PROBE) + len(CONTENT_PROBE) :]
        return tail[: -len(self.closer)] if self.closer and tail.endswith(self.closer) else tail

    def _writes_generation_prompt(self) -> bool:
        """False for a template that ignores `add_generation_prompt` (writes no prompt)."""
        question = [{"role": "user", "content": "\ue000a"}]
        try:
            plain = self.render(question, None, False, {})
            prompted = self.render(question, None, True, {})
        except RowError:
            return True
        if self.closer and plain.endswith(self.closer):
            plain = plain[: -len(self.closer)]
        return plain != prompted

    # -- one conversation ----------------------------------------------------------------------

    def __call__(self, messages: list[dict[str, Any]], trained: list[bool], tools: Any) -> Rendered:
        row = _Row(self, messages, tools)
        every_turn = "all" in (self.policies.eos, self.policies.eot)
        located: list[_Located] = []
        contents: list[Span] = []  # of every message, under an `all` policy
        for index, message in enumerate(messages):
            if not trained[index]:
                if every_turn and (content := row.content(index)) is not None:
                    contents.append(content)
                continue
            turn = row.locate(index, every_turn)
            if turn is None:
                raise RowError(
                    "template error",
                    f"message {index} ({message['role']}) was not found in the rendered "
                    "conversation: the chat template drops or rewrites it",
                )
            located.append(turn)
            if turn.content is not None:
                contents.append(turn.content)
        spans = self._spans(row, located, contents if every_turn else None)
        turns = tuple(
            Turn(
                role=t.role,
                start=t.start,
                end=max(t.start, t.generated_end),
                trainable=True,
                end_marker=t.marker,
            )
            for t in located
        )
        notes = ("trained turns whose reasoning the template drops",) * sum(
            t.reasoning_dropped for t in located
        )
        return Rendered(text=row.text, spans=spans, turns=turns, notes=notes)

    def _spans(
        self, row: _Row, located: list[_Located], contents: list[Span] | None
    ) -> tuple[Span, ...]:
        """The trained turns' text, and end markers as the policies say.

        `contents` (every message's content) is given under an `all` policy, which trains each
        occurrence of a trained turn's end marker (and the closer) in the template's own text —
        after every turn, including turns the template adds itself, never inside a message.
        """
        text = row.text
        spans: list[Span] = []
        for turn in located:
            start = turn.start
            if not self.policies.reasoning and turn.content is not None:
                start = max(start, turn.content[0])  # mask what precedes the visible answer
            spans.append((start, turn.generated_end))
        last = located[-1] if located else None
        markers = set()
        for turn in located:
            if turn.marker is None:
                continue
            marker_text = text[turn.marker[0] : turn.marker[1]]
            markers.add(marker_text)
            if (policy := self._policy(marker_text)) == "turn" or (
                policy == "last" and turn is last
            ):
                spans.append(turn.marker)
        if contents is not None:
            if row.closer.strip():
                markers.add(row.closer.strip())
            for marker in markers:
                if self._policy(marker) != "all":
                    continue
                position = text.find(marker)
                while position != -1:
                    end = position + len(marker)
                    if not any(a < end and position < b for a, b in contents):
                        spans.append((position, end))
                    position = text.find(marker, end)
        return merge_spans(spans)

    def _policy(self, marker: str) -> str:
        return self.policies.eos if marker == self.eos else self.policies.eot


class _Row:
    """The renderings of one conversation, made lazily and kept for the row."""

    def __init__(self, locator: TurnLocator, messages: list[dict[str, Any]], tools: Any) -> None:
        self.locator = locator
        self.messages = messages
        self.tools = tools
        self.text = self._render(messages, False)
        closer = locator.closer
        self.closer = closer if closer and self.text.endswith(closer) else ""
        self._prefixes: dict[tuple[int, bool], str | None] = {}

    def _render(self, messages: Sequence[dict[str, Any]], generation_prompt: bool) -> str:
        return self.locator.render(messages, self.tools, generation_prompt, {})

    def _try(self, messages: Sequence[dict[str, Any]], generation_prompt: bool) -> str | None:
        try:
            return self._render(messages, generation_prompt)
        except RowError:
            return None  # e.g. a template that refuses a conversation ending on a user turn

    def prefix(self, count: int, generation_prompt: bool) -> str | None:
        """The first `count` messages rendered alone (without the closer when there is none)."""
        key = (count, generation_prompt)
        if key not in self._prefixes:
            if count == len(self.messages) and not generation_prompt:
                rendered: str | None = self.text
            else:
                rendered = self._try(self.messages[:count], generation_prompt)
            if rendered is not None and not generation_prompt:
                rendered = self._without_closer(rendered)
            self._prefixes[key] = rendered
        return self._prefixes[key]

    def _without_closer(self, rendered: str) -> str:
        closer = self.locator.closer
        if closer and rendered.endswith(closer):
            return rendered[: -len(closer)]
        return rendered

    def boundary(self, count: int) -> int | None:
        """Where the turn of message `count - 1` ends in the text, when prefixes line up."""
        if count == 0:
            return 0
        rendered = self.prefix(count, False)
        if rendered is not None and self.text.startswith(rendered):
            return len(rendered)
        return None

    # -- one message ---------------------------------------------------------------------------

    def locate(self, index: int, every_turn: bool = False) -> _Located | None:
        message = self.messages[index]
        role = message["role"]
        assistant = role == "assistant"
        needs_content = (
            every_turn
            or not assistant
            or has_reasoning(message)
            or not self.locator.policies.reasoning
        )
        content = self.content(index) if needs_content else None
        end = self.boundary(index + 1)
        trailer = self.trailer_start(index, end, content)
        if trailer is None:
            return None
        generated_end, trailer_text, turn_end = trailer
        if assistant:
            start = self.generation_start(index, content, generated_end)
            if start is None:
                return None
        elif content is not None:
            start = content[0]
        else:
            return None
        marker = self.marker(generated_end, trailer_text, turn_end, index)
        dropped = False
        if assistant and content is not None and has_reasoning(message):
            dropped = not _reasoning_rendered(message, self.text[start : content[0]])
        return _Located(
            index=index,
            role=role,
            start=min(start, generated_end),
            content=content,
            generated_end=generated_end,
            marker=marker,
            reasoning_dropped=dropped,
        )

    def content(self, index: int) -> Span | None:
        """The visible content of message `index` in the text, located in context."""
        message = self.messages[index]
        reasoning, visible = split_reasoning(message)
        blank = visible[: len(visible) - len(visible.lstrip())]
        probe = {**message, "content": reasoning + blank + CONTENT_PROBE}
        rendered = self._try([*self.messages[:index], probe, *self.messages[index + 1 :]], False)
        if rendered is not None and rendered.count(CONTENT_PROBE) == 1:
            cut = rendered.index(CONTENT_PROBE)
            before, after = rendered[:cut], rendered[cut + len(CONTENT_PROBE) :]
            text = self.text
            if (
                len(before) + len(after) <= len(text)
                and text.startswith(before)
                and text.endswith(after)
            ):
                return len(before), len(text) - len(after)
        # A template whose rendering of other turns depends on this content: search for it.
        wanted = visible.strip()
        if not wanted:
            return None
        lower = self.boundary(index) or 0
        found = self.text.find(wanted, lower)
        return (found, found + len(wanted)) if found != -1 else None

    def probe_trailer(self, index: int) -> str | None:
        """What the template writes after message `index`'s content to end its turn."""
        role = self.messages[index]["role"]
        bare = {"role": role, "content": CONTENT_PROBE}
        rendered = self._try([*self.messages[:index], bare], False)
        if rendered is None or rendered.count(CONTENT_PROBE) != 1:
            return None
        tail = rendered[rendered.index(CONTENT_PROBE) + len(CONTENT_PROBE) :]
        closer = self.locator.closer
        if closer and tail.endswith(closer):
            tail = tail[: -len(closer)]
        known = self.locator.trailers.setdefault(role, [])
        if tail not in known and len(known) < MAX_TRAILERS_PER_ROLE:
            known.append(tail)
        return tail

    def trailer_start(
        self, index: int, end: int | None, content: Span | None
    ) -> tuple[int, str, int] | None:
        """(where the turn's trailer starts, the trailer, where the turn ends)."""
        text = self.text
        # Trailers seen before for this role are tried first; a probe renders this turn's own.
        candidates = list(self.locator.trailers.get(self.messages[index]["role"], ()))
        if end is not None:
            for trailer in sorted(candidates, key=len, reverse=True):  # the most specific first
                if text[end - len(trailer) : end] == trailer:
                    return end - len(trailer), trailer, end
            probed = self.probe_trailer(index)
            if probed is not None and text[end - len(probed) : end] == probed:
                return end - len(probed), probed, end
            # The trailer depends on what the turn holds (e.g. a tool call ends differently):
            # everything up to the turn's end is the message's own text, with no marker.
            return end, "", end
        # Prefixes do not line up: search the trailer right after the content.
        if content is None:
            content = self.content(index)
            if content is None:
                return None
        probed = self.probe_trailer(index)
        if probed is not None and probed in candidates:
            candidates.remove(probed)
        if probed is not None:
            candidates.insert(0, probed)
        for trailer in candidates:
            if not trailer.strip():
                continue
            for form in (trailer, trailer.strip()):
                found = text.find(form, content[1])
                if found != -1:
                    return found, form, found + len(form)
        return content[1], "", content[1]

    def generation_start(self, index: int, content: Span | None, upper: int) -> int | None:
        """Where the assistant's own text starts: right after the generation prompt."""
        text = self.text
        prompt = self.prefix(index, True)
        if prompt is not None and text.startswith(prompt) and len(prompt) <= upper:
            if self.locator.writes_generation_prompt:
                return len(prompt)
            # No generation prompt: a role header before the content is the template's, not
            # the model's (blank text there, like Mistral's space after [/INST], is the model's).
            content = content or self.content(index)
            if content is not None and text[len(prompt) : content[0]].strip():
                return content[0]
            return len(prompt)
        # The prefix does not line up (turns rendered by position, or a generation prompt the
        # history does not repeat, like DeepSeek-R1's "<think>\n"): find the generation prompt,
        # or its longest start, right before this turn's content.
        if content is None:
            content = self.content(index)
        if content is not None:
            upper = min(upper, content[0])
        previous_end = self.turn_end(index - 1) if index else 0
        lower = previous_end if previous_end is not None else (self.boundary(index) or 0)
        previous = self.prefix(index, False)
        if prompt is not None and previous is not None and prompt.startswith(previous):
            header = prompt[len(previous) :]
            if not header and previous_end is not None and previous_end <= upper:
                return previous_end  # no generation prompt: the model speaks right after
            for size in range(len(header), 0, -1):
                found = text.rfind(header[:size], lower, upper)
                if found != -1:
                    return found + size
        return content[0] if content is not None else None

    def turn_end(self, index: int) -> int | None:
        """Where message `index`'s turn (trailer included) ends in the text."""
        end = self.boundary(index + 1)
        if end is not None:
            return end
        found = self.trailer_start(index, None, None)
        return found[2] if found is not None else None

    def marker(self, generated_end: int, trailer: str, turn_end: int, index: int) -> Span | None:
        """The end-of-turn marker: the trailer's non-blank text (or a configured eot string)."""
        text = self.text
        region_end = turn_end
        if index == len(self.messages) - 1 and self.closer:
            region_end = len(text)
        strings = self.locator.policies.eot_strings
        if strings:
            hits = [
                (position, position + len(s))
                for s in strings
                if (position := text.find(s, generated_end, region_end)) != -1
            ]
            return min(hits) if hits else None
        if trailer.strip():
            lead = len(trailer) - len(trailer.lstrip())
            start = generated_end + lead
            return start, start + len(trailer.strip())
        if index == len(self.messages) - 1 and self.closer.strip():
            # No text closes the turn itself; the conversation's closer (eos) ends it.
            closer = self.closer
            start = len(text) - len(closer) + (len(closer) - len(closer.lstrip()))
            return start, start + len(closer.strip())
        return None


def _reasoning_rendered(message: dict[str, Any], before_content: str) -> bool:
    """Whether the message's reasoning appears in the text the model generates before its answer."""
    reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f)), None)
    if reasoning is None:
        reasoning = split_reasoning(message)[0].replace("<think>", "").replace("</think>", "")
    words = str(reasoning).strip()
    return not words or words[: min(len(words), 40)] in before_content
