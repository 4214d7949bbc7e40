"""`sft preprocess --debug`: examples token by token, trained vs masked, and a self-check."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from sft.config.schema import Config
from sft.data.sample import IGNORE_INDEX, Rendered
from sft.data.sources import read_rows
from sft.data.tokenize import TokenizeOptions, process_chunk
from sft.paths import redact

if TYPE_CHECKING:
    from sft.manager import SftPlugins

TRAINED_OPEN, TRAINED_CLOSE = "⟦", "⟧"


@attrs.frozen
class Example:
    dataset: str
    row: int
    input_ids: list[int]
    labels: list[int]
    problems: list[str]


def _check(
    rendered: Rendered,
    ids: list[int],
    labels: list[int],
    offsets: list[tuple[int, int]],
    eos: str | None,
) -> list[str]:
    problems = []
    if all(label == IGNORE_INDEX for label in labels):
        problems.append("no trainable token")
    for number, turn in enumerate(rendered.turns):
        if not turn.trainable:
            continue
        inside = [i for i, (s, e) in enumerate(offsets) if s < turn.end and e > turn.start]
        if turn.end > turn.start and not any(labels[i] != IGNORE_INDEX for i in inside):
            problems.append(f"trainable turn {number} ({turn.role}) has no trained token")
        if turn.end_marker is not None:
            marker = [
                i
                for i, (s, e) in enumerate(offsets)
                if s < turn.end_marker[1] and e > turn.end_marker[0]
            ]
            trained = any(labels[i] != IGNORE_INDEX for i in marker)
            inside_span = any(
                a <= turn.end_marker[0] and turn.end_marker[1] <= b for a, b in rendered.spans
            )
            if trained != inside_span:
                problems.append(
                    f"end-of-turn token of turn {number} trained={trained}, expected {inside_span}"
                )
    if eos and rendered.turns and not any(t.end_marker for t in rendered.turns if t.trainable):
        problems.append(
            "no end-of-turn token found after the trained turns (the model may never stop)"
        )
    return problems


def debug_examples(
    config: Config, tokenizer: Any, plugins: SftPlugins, count: int
) -> list[Example]:
    """Render the first `count` rows of each dataset and check their labels."""
    from sft.data.pipeline import build_render

    examples = []
    for ds in config.datasets:
        raw = read_rows(ds, "skip")
        render = build_render(ds, tokenizer, config, plugins)
        options = TokenizeOptions(
            sequence_len=config.sequence_len,
            excess_length_strategy="truncate"
            if config.excess_length_strategy == "raise"
            else config.excess_length_strategy,
            invalid_rows="skip",
            train_on_inputs=config.train_on_inputs,
            min_sample_len=config.min_sample_len or 0,
        )
        for index in range(min(count, len(raw.rows))):
            _, number = raw.where(index)
            try:
                produced = render(raw.rows[index])
            except Exception as exc:
                examples.append(Example(raw.name, number, [], [], [f"row error: {exc}"]))
                continue
            sample = (produced if isinstance(produced, list) else [produced])[0]
            if isinstance(sample, Rendered):
                # The labels training uses (same code path), checked against the turns found.
                result = process_chunk([raw.rows[index]], 0, render, tokenizer, options)
                if not result.input_ids:
                    reasons = ", ".join(result.dropped) or (
                        result.errors[0].reason if result.errors else "dropped"
                    )
                    examples.append(
                        Example(raw.name, number, [], [], [f"row not trained: {reasons}"])
                    )
                    continue
                ids, labels = result.input_ids[0], result.labels[0]
                encoded = tokenizer(
                    sample.text,
                    add_special_tokens=sample.add_special_tokens,
                    return_offsets_mapping=True,
                )
                offsets = [tuple(o) for o in encoded["offset_mapping"]][: len(ids)]
                problems = _check(sample, ids, labels, offsets, tokenizer.eos_token)
            else:
                ids, labels = list(sample.input_ids), list(sample.labels)
                problems = ["no trainable token"] if all(x == IGNORE_INDEX for x in labels) else []
            examples.append(Example(raw.name, number, ids, labels, problems))
    return examples


def render_example(example: Example, tokenizer: Any, console: Any, show_ids: bool) -> None:
    from rich.text import Text

    plain = not console.is_terminal or console.no_color
    console.print(
        f"── {redact(example.dataset)}, row {example.row} ({len(example.input_ids)} tokens, "
        f"{sum(1 for x in example.labels if x != IGNORE_INDEX)} trained) ──",
        style="bold",
    )
    text = Text()
    previous_trained = False
    for token_id, label in zip(example.input_ids, example.labels, strict=True):
        trained = label != IGNORE_INDEX
        piece = tokenizer.decode([token_id])
        if show_ids:
            piece += f"({token_id})"
        if plain and trained != previous_trained:
            text.append(TRAINED_OPEN if trained else TRAINED_CLOSE)
        text.append(piece, style="bold green" if trained else "dim")
        previous_trained = trained
    if plain and previous_trained:
        text.append(TRAINED_CLOSE)
    console.print(text)
    if example.problems:
        for problem in example.problems:
            console.print(f"  ✗ {problem}", style="red")
    else:
        console.print("  ✓ self-check passed", style="green")
