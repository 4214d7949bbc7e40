"""The `sft` command. Imports stay light: `--help`, `plugins list` and `validate` never import
torch or transformers; heavy subcommands import their modules inside their handlers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import sft
from sft.errors import Interrupted, SftError, UsageError

if TYPE_CHECKING:
    from sft.config.schema import Config
    from sft.manager import SftPlugins

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=True)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="config file (.toml, or .yaml/.yml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (repeatable), e.g. --set learning_rate=1e-4 "
        "--set datasets[0].path=data.jsonl",
    )


def _add_trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow the model's own Python code to run (a DIR's files never turn this on; "
        "a CONFIG's trust_remote_code key does)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sft",
        description="Supervised fine-tuning for causal language models.",
    )
    parser.add_argument("--version", action="version", version=f"sft {sft.__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="show the full traceback of errors (or SFT_DEBUG=1)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    validate = commands.add_parser(
        "validate", help="check a config: every problem at once, no model load"
    )
    _add_config_args(validate)
    validate.add_argument(
        "--portable",
        action="store_true",
        help="check the config only, not whether this machine can run it (GPU, kernel packages)",
    )
    validate.set_defaults(handler=cmd_validate)

    run = commands.add_parser("run", help="fine-tune: prepare data, train, save")
    _add_config_args(run)
    from sft.launch import add_launch_arguments

    add_launch_arguments(run)
    run.set_defaults(handler=cmd_run)

    merge = commands.add_parser("merge-lora", help="merge the trained adapter into its base model")
    _add_config_args(merge)
    merge.add_argument("--output", help="where to write (default: OUTPUT_DIR/merged)")
    _add_trust_arg(merge)
    merge.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output: replace the model and tokenizer files there "
        "(other files are kept)",
    )
    merge.set_defaults(handler=cmd_merge_lora)

    sharded = commands.add_parser(
        "merge-sharded",
        help="turn a sharded checkpoint (fsdp SHARDED_STATE_DICT) into one safetensors model",
    )
    sharded.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a checkpoint-N directory")
    sharded.add_argument("--output", required=True, help="where to write the model or adapter")
    _add_trust_arg(sharded)
    sharded.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --output: replace the model and tokenizer files there "
        "(other files are kept)",
    )
    sharded.set_defaults(handler=cmd_merge_sharded)

    chat = commands.add_parser("chat", help="talk to the fine-tuned model")
    chat.add_argument(
        "target", metavar="CONFIG|DIR", help="a config (its output_dir) or a directory sft wrote"
    )
    chat.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a key of CONFIG (e.g. --set output_dir=other)",
    )
    chat.add_argument("--prompt", help="answer this one message and exit (for scripts)")
    chat.add_argument("--system", help="system message")
    chat.add_argument(
        "--base", action="store_true", help="talk to the base model instead (before/after)"
    )
    chat.add_argument("--max-new-tokens", type=int, default=256)
    _add_trust_arg(chat)
    chat.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    chat.set_defaults(handler=cmd_chat)

    preprocess = commands.add_parser(
        "preprocess", help="tokenize, mask and cache the datasets; print a summary"
    )
    _add_config_args(preprocess)
    preprocess.add_argument(
        "--debug", action="store_true", help="show examples token by token and self-check labels"
    )
    preprocess.add_argument(
        "--debug-num-examples", type=int, default=3, metavar="N", help="examples per dataset"
    )
    preprocess.add_argument("--ids", action="store_true", help="with --debug: show token ids")
    preprocess.add_argument(
        "--no-cache", action="store_true", help="re-prepare even when a cached copy exists"
    )
    preprocess.set_defaults(handler=cmd_preprocess)

    plugins = commands.add_parser("plugins", help="installed plugins")
    plugin_commands = plugins.add_subparsers(
        dest="plugins_command", metavar="COMMAND", parser_class=_Parser
    )
    listing = plugin_commands.add_parser(
        "list", help="list plugins, what each provides, and their health"
    )
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument(
        "--hooks", action="store_true", help="also show the hooks each plugin implements"
    )
    listing.set_defaults(handler=cmd_plugins_list)
    return parser


# -- commands -------------------------------------------------------------------------------


def _load_config(args: argparse.Namespace, machine_checks: bool = True) -> Config:
    """The command's config, validated against the process's plugins (the set a test can
    replace with `sft.manager.set_plugins`)."""
    from sft.config import load_config
    from sft.manager import get_plugins

    return load_config(
        args.config, overrides=args.overrides, plugins=get_plugins(), machine_checks=machine_checks
    )


def cmd_validate(args: argparse.Namespace) -> int:
    config = _load_config(args, machine_checks=not args.portable)
    console = _console()
    from sft.paths import redact

    names = ", ".join(f"{redact(d.path)} ({d.type or 'pre-tokenized'})" for d in config.datasets)
    console.print(f"[green]✓[/] {args.config} is valid")
    console.print(f"  model      {config.base_model}")
    console.print(f"  adapter    {config.adapter or 'none (full fine-tune)'}")
    console.print(f"  datasets   {names}")
    console.print(f"  optimizer  {config.optimizer}, lr {config.learning_rate:g}")
    console.print(f"  attention  {config.attention}")
    for warning in config.warnings:  # keys that change nothing: shown, never failing
        console.print("warning: ", style="yellow", end="")
        console.print(warning.render(), markup=False)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from sft.launch import launch, wants_launch

    config = _load_config(args)  # every problem before launching
    if wants_launch(args):
        return launch(args, args.argv)
    from sft.train.run import train

    train(config, console=_console())
    return 0


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sft.inference import locate, merge_lora
    from sft.train.quiet import quiet_libraries

    quiet_libraries()
    trained = locate(args.config, tuple(args.overrides), trust_remote_code=args.trust_remote_code)
    target = merge_lora(trained, Path(args.output) if args.output else None, args.overwrite)
    _console().print(f"merged model written to {target}")
    return 0


def cmd_merge_sharded(args: argparse.Namespace) -> int:
    from pathlib import Path

    from sft.sharded import merge_sharded
    from sft.train.quiet import quiet_libraries

    quiet_libraries()
    target, kind = merge_sharded(
        Path(args.checkpoint), Path(args.output), args.overwrite, args.trust_remote_code
    )
    _console().print(f"merged {kind} written to {target}")
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from sft.inference import load_trained, locate, reply
    from sft.train.quiet import quiet_libraries

    quiet_libraries()
    trained = locate(args.target, tuple(args.overrides), trust_remote_code=args.trust_remote_code)
    model, tokenizer = load_trained(trained, base_only=args.base)
    console = _console()
    history: list[dict[str, str]] = (
        [{"role": "system", "content": args.system}] if args.system else []
    )

    def ask(text: str) -> None:
        history.append({"role": "user", "content": text})
        answer = reply(
            model,
            tokenizer,
            history,
            args.max_new_tokens,
            args.temperature,
            on_text=lambda piece: console.print(piece, end="", markup=False, highlight=False),
            template_variables=trained.template_variables,
        )
        console.print()
        history.append({"role": "assistant", "content": answer})

    if args.prompt is not None:
        ask(args.prompt)
        return 0
    console.print(
        f"chatting with {trained.directory}{' (base model)' if args.base else ''}; empty line or Ctrl-D to quit"
    )
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        ask(text)
    return 0


def cmd_preprocess(args: argparse.Namespace) -> int:
    from sft.data.pipeline import prepare_datasets
    from sft.tokenizer import load_tokenizer

    config = _load_config(args)
    plugins = config.plugin_set
    console = _console()
    if config.streaming:
        return _preprocess_streaming(
            config, load_tokenizer(config, plugins), plugins, console, args
        )
    # Without a tokenizer: a cache hit then needs none (nor transformers); a miss loads it.
    prepared = prepare_datasets(config, None, plugins, use_cache=not args.no_cache)
    console.print(prepared.summary.table())
    for line in prepared.summary.lines():
        console.print(line)
    from sft.data.packing import pack_prepared

    pack_prepared(config, prepared, plugins, console)
    if prepared.cache_dir is not None:
        state = "loaded from" if prepared.from_cache else "written to"
        console.print(f"prepared data {state} {prepared.cache_dir}")
    if args.debug:
        from sft.data.debug import debug_examples, render_example

        tokenizer = load_tokenizer(config, plugins)
        examples = debug_examples(config, tokenizer, plugins, args.debug_num_examples)
        for example in examples:
            render_example(example, tokenizer, console, args.ids)
        failed = [e for e in examples if e.problems]
        zero = sum(d.dropped.get("no trainable tokens", 0) for d in prepared.summary.datasets)
        console.print(
            f"self-check: {len(examples) - len(failed)}/{len(examples)} examples passed; "
            f"{zero} rows without trainable tokens were dropped"
        )
        return 0 if not failed else 5
    return 0


def _preprocess_streaming(
    config: Any, tokenizer: Any, plugins: SftPlugins, console: Any, args: argparse.Namespace
) -> int:
    """With `streaming = true` the training data is read while training: nothing to prepare."""
    console.print(
        "streaming = true: the training data is read, tokenised and packed while training; "
        "nothing to prepare or cache"
        + ("" if args.debug else " (--debug shows the first rows of each dataset)")
    )
    if not args.debug:
        return 0
    from sft.data.debug import render_example
    from sft.data.streaming import debug_preview

    examples = debug_preview(config, tokenizer, plugins, args.debug_num_examples)
    for example in examples:
        render_example(example, tokenizer, console, args.ids)
    failed = [e for e in examples if e.problems]
    console.print(f"self-check: {len(examples) - len(failed)}/{len(examples)} examples passed")
    return 0 if not failed else 5


def plugin_rows(plugins: SftPlugins) -> list[dict[str, Any]]:
    """One row per plugin with stable keys: name, package, version, hooks, provides, status, error."""
    provided, conflicts = plugins.provides()
    unavailable = _unavailable(plugins)
    rows = []
    for name, record in sorted(plugins.records.items()):
        status, error = record.status, record.error
        if status == "ok" and name in conflicts:
            status, error = "error", conflicts[name]
        elif status == "ok" and name in unavailable:
            status, error = "unavailable", unavailable[name]
        rows.append(
            {
                "name": record.name,
                "package": record.package,
                "version": record.version,
                "hooks": plugins.hooks_of(name),
                "provides": provided.get(name, {}),
                "status": status,
                "error": error,
            }
        )
    return rows


def _unavailable(plugins: SftPlugins) -> dict[str, str]:
    """{plugin: why, and how to install it} for kernels, attention backends and engines whose
    runtime is missing here."""
    found: dict[str, list[str]] = {}
    for registry in (
        plugins.kernels(),
        plugins.attention_backends(),
        plugins.distributed_backends(),
    ):
        for name, component in registry.items():
            if getattr(component, "available", None) is None:
                continue
            owner = registry.owner(name)
            try:
                ok, how = component.available()
            except Exception as exc:  # listing must not die of one plugin's bug
                ok, how = False, f"its availability check raised {type(exc).__name__}: {exc}"
            if not ok:
                found.setdefault(owner, []).append(f"{name}: {how}")
    return {owner: "; ".join(reasons) for owner, reasons in found.items()}


def cmd_plugins_list(args: argparse.Namespace) -> int:
    from sft.manager import get_plugins

    plugins = get_plugins()
    rows = plugin_rows(plugins)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.table import Table

    table = Table(title="sft plugins", title_justify="left")
    for column in ("plugin", "package", "version", "provides", "status"):
        table.add_column(column, overflow="fold")
    if args.hooks:
        table.add_column("hooks", overflow="fold")
    for row in rows:
        provides = "\n".join(
            f"{kind}: {', '.join(names)}" for kind, names in row["provides"].items()
        )
        status = {"ok": "[green]ok[/]", "error": f"[red]error[/]: {row['error']}"}.get(
            row["status"], f"[yellow]{row['status']}[/]: {row['error']}"
        )
        cells = [row["name"], row["package"] or "-", row["version"] or "-", provides or "-", status]
        if args.hooks:
            cells.append("\n".join(row["hooks"]))
        table.add_row(*cells)
    console = _console()
    console.print(table)
    for problem in plugins.problems:
        console.print(f"[yellow]warning:[/] {problem}")
    return 0


# -- entry point ----------------------------------------------------------------------------


def _show_error(error: SftError, show_traceback: bool) -> None:
    console = _console(stderr=True)
    if show_traceback:
        console.print("".join(traceback.format_exception(error)), markup=False, style="dim")
    console.print(f"{error.title}: ", style="bold red", end="")
    console.print(error.render(), style="red", markup=False)


def main(argv: Sequence[str] | None = None) -> int:
    from sft import distributed

    worker = distributed.world_size() > 1  # one of a launcher's processes
    try:
        exit_code = _main(argv)
    except Exception:
        if not (distributed.close_process_group() and worker):
            raise
        traceback.print_exc()
        distributed.end_worker_process(1)
    if distributed.close_process_group() and worker:  # this call joined a group
        distributed.end_worker_process(exit_code)
    return exit_code


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    raw = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in raw or os.environ.get("SFT_DEBUG", "") not in ("", "0")
    try:
        args = parser.parse_args(raw)
        handler: Handler | None = getattr(args, "handler", None)
        if handler is None:
            target = parser
            if getattr(args, "command", None) == "plugins":
                target = parser._subparsers._group_actions[0].choices["plugins"]  # type: ignore[union-attr,index]
            target.print_help()
            return 0 if args.command is None else 4
        args.argv = raw  # the launcher hands the same arguments to each process
        return handler(args)
    except SftError as error:
        _show_error(error, show_traceback)
        return error.exit_code
    except Interrupted as stop:  # Ctrl-C / SIGTERM handled by the run: what was kept, how to go on
        if stop.message:
            _console(stderr=True).print(stop.message, style="yellow", markup=False)
        return stop.exit_code
    except KeyboardInterrupt:
        _console(stderr=True).print("[red]interrupted[/]")
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
