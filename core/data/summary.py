"""What preparing the data did: rows in, kept, dropped by reason, tokens, trainable share."""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs

from sft.paths import redact

PERCENTILES = (50, 90, 99, 100)


@attrs.define
class DatasetSummary:
    name: str
    strategy: str
    rows_in: int
    rows_kept: int
    samples: int
    dropped: dict[str, int]
    tokens: int
    trainable_tokens: int
    length_percentiles: dict[str, int]
    notes: dict[str, int] = attrs.field(factory=dict)  # e.g. reasoning the template dropped

    @classmethod
    def from_lengths(
        cls,
        name: str,
        strategy: str,
        rows_in: int,
        rows_kept: int,
        dropped: Counter[str] | dict[str, int],
        lengths: Any,
        tokens: int,
        trainable_tokens: int,
        notes: Counter[str] | None = None,
    ) -> DatasetSummary:
        """From the samples' token counts (`lengths`, a numpy array) and the totals."""
        import numpy as np

        spread = lengths if len(lengths) else np.zeros(1)
        return cls(
            name=name,
            strategy=strategy,
            rows_in=rows_in,
            rows_kept=rows_kept,
            samples=len(lengths),
            dropped=dict(sorted(dropped.items())),
            tokens=tokens,
            trainable_tokens=trainable_tokens,
            length_percentiles={
                f"p{p}" if p < 100 else "max": int(np.percentile(spread, p)) for p in PERCENTILES
            },
            notes=dict(sorted((notes or Counter()).items())),
        )

    @property
    def trainable_share(self) -> float:
        return self.trainable_tokens / self.tokens if self.tokens else 0.0

    def rows_line(self) -> str:
        """`chat.jsonl: 12 rows in, 10 kept, dropped: invalid JSON: 1, longer than …: 1`."""
        text = f"{redact(self.name)}: {self.rows_in} rows in, {self.rows_kept} kept"
        if self.dropped:
            text += ", dropped: " + ", ".join(f"{r}: {n}" for r, n in self.dropped.items())
        return text


@attrs.define
class Summary:
    datasets: list[DatasetSummary] = attrs.field(factory=list)
    eval_datasets: list[DatasetSummary] = attrs.field(factory=list)
    duplicates: int = 0
    train_samples: int = 0
    eval_samples: int = 0

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary:
        return cls(
            datasets=[DatasetSummary(**d) for d in data["datasets"]],
            eval_datasets=[DatasetSummary(**d) for d in data["eval_datasets"]],
            duplicates=data["duplicates"],
            train_samples=data["train_samples"],
            eval_samples=data["eval_samples"],
        )

    def table(self) -> Any:
        from rich.table import Table

        table = Table(title="prepared data", title_justify="left")
        for column in (
            "dataset",
            "type",
            "rows in",
            "kept",
            "dropped (reason: rows)",
            "tokens",
            "trained",
            "length p50/p90/p99/max",
        ):
            table.add_column(
                column,
                overflow="fold",
                justify="right" if column in ("rows in", "kept", "tokens", "trained") else "left",
            )
        for label, group in (("", self.datasets), ("eval: ", self.eval_datasets)):
            for d in group:
                dropped = ", ".join(f"{reason}: {n}" for reason, n in d.dropped.items()) or "none"
                lengths = "/".join(str(v) for v in d.length_percentiles.values())
                table.add_row(
                    label + redact(d.name),
                    d.strategy,
                    str(d.rows_in),
                    str(d.rows_kept),
                    dropped,
                    f"{d.tokens:,}",
                    f"{d.trainable_share:.1%}",
                    lengths,
                )
        return table

    def dropped_lines(self) -> list[str]:
        """One line per dataset that lost rows or samples, with the reasons (for `sft run`)."""
        lines = [
            label + d.rows_line()
            for label, group in (("", self.datasets), ("eval ", self.eval_datasets))
            for d in group
            if d.dropped or d.rows_kept < d.rows_in
        ]
        if self.duplicates:
            lines.append(f"exact duplicates dropped: {self.duplicates}")
        return lines + self.note_lines()

    def note_lines(self) -> list[str]:
        """Facts the strategies counted on kept rows (e.g. reasoning a template dropped)."""
        return [
            f"note: {label}{redact(d.name)}: {note}: {count}"
            for label, group in (("", self.datasets), ("eval ", self.eval_datasets))
            for d in group
            for note, count in d.notes.items()
        ]

    def lines(self) -> list[str]:
        text = [
            f"train samples: {self.train_samples}, eval samples: {self.eval_samples}"
            + (f", exact duplicates dropped: {self.duplicates}" if self.duplicates else "")
        ]
        return text + self.note_lines()
