"""User-facing errors. The CLI prints an `SftError` as one red block without a traceback."""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from sft.paths import redact


class SftError(Exception):
    """An error the user can fix. Anything that is not an `SftError` is a bug in sft or a plugin."""

    exit_code = 1
    title = "error"

    def __init__(self, *args: object) -> None:
        # Messages name dataset paths; a URL's credentials must not reach a terminal or a log.
        super().__init__(*(redact(a) if isinstance(a, str) else a for a in args))

    def render(self) -> str:
        return str(self)


class UsageError(SftError):
    """Wrong command-line usage (missing file, bad `--set`)."""

    exit_code = 4
    title = "usage error"


@attrs.frozen
class Problem:
    """One configuration problem: where it is, what was found, and what would be valid."""

    path: str
    message: str
    line: int | None = None
    file: str | None = None
    hint: str | None = None
    machine: bool = False  # about this machine (no GPU, package missing), not the config itself
    # A key that changes nothing but harms nothing (e.g. eval_steps without an eval set): shown
    # in yellow by `sft validate` and `sft run`, never fails them. See `Config.warnings`.
    warning: bool = False

    def render(self) -> str:
        where = self.path or "<config>"
        if self.line is not None:
            where = f"{where} (line {self.line})"
        elif self.file == "--set":
            where = f"{where} (--set)"
        text = f"{where}: {self.message}"
        if self.machine:
            text += " [this machine]"
        if self.hint:
            text += f"\n    fix: {self.hint}"
        return text


class ConfigError(SftError):
    """Every problem found in a config, reported together."""

    exit_code = 4
    title = "config error"

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = sorted(problems, key=lambda p: (p.line is None, p.line or 0))
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in {self.source or 'the config'}:"
        return redact("\n".join([head, *(f"  - {p.render()}" for p in self.problems)]))


class PluginError(SftError):
    """A plugin failed to load, conflicts with another plugin, or broke a hook contract."""

    exit_code = 3
    title = "plugin error"

    def __init__(self, message: str, plugin: str | None = None, package: str | None = None):
        self.plugin = plugin
        self.package = package
        super().__init__(message)


class DataError(SftError):
    """A dataset problem, naming the file and the row where there is one."""

    exit_code = 5
    title = "data error"

    def __init__(
        self,
        message: str,
        file: str | None = None,
        row: int | None = None,
        field: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.row = row
        self.field = field
        self.hint = hint
        where = []
        if file:
            where.append(str(file))
        if row is not None:
            where.append(f"row {row}")
        if field:
            where.append(f"field {field!r}")
        text = f"{', '.join(where)}: {message}" if where else message
        if hint:
            text += f"\n  fix: {hint}"
        super().__init__(text)


class ModelError(SftError):
    """The model, tokenizer or hardware cannot do what the config asks."""

    exit_code = 6
    title = "model error"


class ResumeError(SftError):
    """Resuming would continue a checkpoint with settings that do not match it."""

    exit_code = 4
    title = "resume error"


class Interrupted(KeyboardInterrupt):
    """The run stopped on Ctrl-C (SIGINT) or SIGTERM. Not an error: `message` says what was kept
    and how to continue; the CLI prints it and exits with `exit_code` (130 SIGINT, 143 SIGTERM).

    A `KeyboardInterrupt`, so library code that cleans up on Ctrl-C does so here too.
    """

    def __init__(self, message: str, exit_code: int, checkpoint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.checkpoint = checkpoint
