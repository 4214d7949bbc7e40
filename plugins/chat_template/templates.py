"""Which chat template a config selects, and what is wrong with the selection.

One resolver, `find_template`, serves both `sft validate` (no tokenizer yet: every problem is
reported) and the strategy factory and tokenizer hook (which raise on the first).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sft.errors import ConfigError, Problem

TEMPLATES_DIR = Path(__file__).parent / "templates"
BUILTIN_TEMPLATES = (
    "chatml",
    "llama3",
    "mistral",
    "gemma",
    "phi_3",
    "qwen",
    # Axolotl's names for models' own templates (the files copied verbatim from Axolotl:
    # templates/README.md)
    "alpaca",
    "aya",
    "cohere",
    "deepseek_v2",
    "deepseek_v3",
    "exaone",
    "exaone4",
    "falcon_h1",
    "gemma3",
    "gemma3n",
    "gemma4",
    "gemma4_unified",
    "jamba",
    "llama4",
    "metharme",
    "mistral_v1",
    "mistral_v2v3",
    "mistral_v3_tekken",
    "mistral_v7_tekken",
    "nemotron_h",
    "phi_35",
    "phi_4",
    "qwen3",
    "qwen3_5",
    "qwen_25",
)
TOKENIZER_DEFAULTS = ("tokenizer_default", "tokenizer_default_fallback_chatml")
KNOWN_NAMES = (*BUILTIN_TEMPLATES, *TOKENIZER_DEFAULTS, "jinja")
SYNTAX_HINT = "fix the template (Jinja syntax: {{ ... }}, {% ... %}, every block closed)"


def builtin_template(name: str) -> str:
    return (TEMPLATES_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def find_template(
    name: str | None, jinja: str | None, path: str, tokenizer: Any = None
) -> tuple[str | None, list[Problem]]:
    """The template text that `<path>` and `<path>_jinja` select, and the problems with them.

    Without a tokenizer (validation, before one is loaded) a tokenizer's own template is not
    looked up: the text is None and no problem is reported for it.
    """
    if jinja and name is None:
        name = "jinja"
    if name is not None and name not in KNOWN_NAMES:
        from sft.registry import did_you_mean

        guess = did_you_mean(name, KNOWN_NAMES)
        return None, [
            Problem(
                path,
                f"unknown chat template {name!r}" + (f"; did you mean {guess!r}?" if guess else ""),
                hint=f"one of {', '.join(KNOWN_NAMES)}",
            )
        ]
    if name == "jinja":
        return _jinja_template(jinja, path)
    if jinja:
        return None, [
            Problem(
                f"{path}_jinja",
                f"has no effect with chat_template = {name!r}: only 'jinja' reads it",
                hint="remove chat_template_jinja, or set chat_template = 'jinja' to use it",
            )
        ]
    if name in BUILTIN_TEMPLATES:
        return builtin_template(name), []
    if tokenizer is None:
        return None, []
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if template:
        return str(template), []
    if name == "tokenizer_default_fallback_chatml":
        return builtin_template("chatml"), []
    return None, [
        Problem(
            path,
            "the tokenizer has no chat template and none is configured",
            hint="set chat_template = 'chatml' (or another built-in: "
            f"{', '.join(BUILTIN_TEMPLATES)}), or chat_template = 'jinja' with chat_template_jinja",
        )
    ]


# Names a rendering sets itself: apply_chat_template's own parameters, and the tokenizer's
# special tokens (which sft also uses to find where each turn ends).
RENDERING_NAMES = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
    }
)
SPECIAL_TOKEN_NAMES = frozenset(
    {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"}
)


def template_variable_problems(variables: dict[str, Any] | None) -> list[Problem]:
    """`chat_template_kwargs` entries that would override what the rendering sets itself."""
    problems = []
    for name in sorted(variables or {}):
        if name in SPECIAL_TOKEN_NAMES:
            problems.append(
                Problem(
                    f"chat_template_kwargs.{name}",
                    "is the tokenizer's own special token: the template reads it from there",
                    hint=f"remove it, and set special_tokens = {{{name} = '...'}} to change it",
                )
            )
        elif name in RENDERING_NAMES:
            problems.append(
                Problem(
                    f"chat_template_kwargs.{name}",
                    "is set by sft when it renders each conversation (it renders turns with and "
                    "without a generation prompt to find the labels)",
                    hint=f"remove {name} from chat_template_kwargs",
                )
            )
    return problems


def resolve_template(name: str | None, jinja: str | None, tokenizer: Any, path: str) -> str:
    """The template text a config selects; `ConfigError` when there is none or it is broken."""
    template, problems = find_template(name, jinja, path, tokenizer)
    if problems or template is None:
        raise ConfigError(problems)
    return template


def _jinja_template(jinja: str | None, path: str) -> tuple[str | None, list[Problem]]:
    if not jinja:
        return None, [
            Problem(
                path,
                "chat_template = 'jinja' needs chat_template_jinja (the template text or a file)",
            )
        ]
    text = jinja if "{" in jinja else _read_text(Path(jinja).expanduser())
    if text is None:
        return None, [
            Problem(
                f"{path}_jinja",
                f"template file not found: {jinja}",
                hint="give a path to a .jinja file, or the template text itself",
            )
        ]
    if error := syntax_problem(text):
        return None, [
            Problem(
                f"{path}_jinja",
                f"the chat template is not valid Jinja ({error})",
                hint=SYNTAX_HINT,
            )
        ]
    return text, []


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


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
