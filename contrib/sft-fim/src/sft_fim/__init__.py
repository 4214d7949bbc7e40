"""`type = "fim"`: fill-in-the-middle training on code (prefix + suffix -> middle).

Each row's code is cut at two seeded random character positions into prefix, middle and
suffix (or the row holds the three pieces), and with probability `fim_rate` it is trained as

    PSM: <fim_prefix> prefix <fim_suffix> suffix <fim_middle> middle <eos>
    SPM: <fim_prefix> <fim_suffix> suffix <fim_middle> prefix middle <eos>   (fim_spm_rate)

with only the middle and the end token trained. The other rows are trained whole, left to
right, exactly as `type = "completion"` trains them. The sentinel tokens are found in the
tokenizer's vocabulary (StarCoder, Qwen2.5-Coder, CodeLlama, DeepSeek-Coder conventions) or
named by the `fim_*_token` keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Sequence
from typing import Any, Literal

import attrs

from sft import plugin

# ------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------


@attrs.frozen
class FimKeys:
    fim_split: Literal["random", "fields"] = plugin.key(
        "random",
        doc="FIM: where a row's prefix, middle and suffix come from: 'random' cuts fim_field "
        "at two random character positions (seeded by `seed` and the text); 'fields' reads "
        "them from fim_prefix_field, fim_middle_field and fim_suffix_field.",
    )
    fim_field: str = plugin.key("text", doc="FIM: row field with the code (fim_split = 'random').")
    fim_prefix_field: str = plugin.key(
        "prefix", doc="FIM: row field with the prefix (fim_split = 'fields')."
    )
    fim_middle_field: str = plugin.key(
        "middle", doc="FIM: row field with the middle, the trained part (fim_split = 'fields')."
    )
    fim_suffix_field: str = plugin.key(
        "suffix", doc="FIM: row field with the suffix (fim_split = 'fields')."
    )
    fim_rate: float = plugin.key(
        0.9,
        ge=0.0,
        le=1.0,
        doc="FIM: share of rows (fim_split = 'random') trained as fill-in-the-middle; the others "
        "are trained whole, left to right (0: all plain completion, 1: all FIM).",
    )
    fim_spm_rate: float = plugin.key(
        0.0,
        ge=0.0,
        le=1.0,
        doc="FIM: share of FIM rows in SPM order (suffix before prefix) rather than PSM.",
    )
    fim_prefix_token: str | None = plugin.key(
        None,
        doc="FIM: the prefix sentinel token (default: found in the vocabulary, e.g. "
        "<fim_prefix>); set with fim_suffix_token and fim_middle_token, or none of them.",
    )
    fim_suffix_token: str | None = plugin.key(
        None, doc="FIM: the suffix sentinel token (e.g. <fim_suffix>); see fim_prefix_token."
    )
    fim_middle_token: str | None = plugin.key(
        None, doc="FIM: the middle sentinel token (e.g. <fim_middle>); see fim_prefix_token."
    )
    fim_end_token: str | None = plugin.key(
        None,
        doc="FIM: the token trained after the middle (default: CodeLlama's <EOT> with "
        "CodeLlama sentinels, else the tokenizer's EOS).",
    )


SENTINEL_KEYS = ("fim_prefix_token", "fim_suffix_token", "fim_middle_token")
DEFAULTS = FimKeys()


# ------------------------------------------------------------------------------------------
# sentinel tokens
# ------------------------------------------------------------------------------------------


@attrs.frozen
class Family:
    """One model family's FIM sentinels, as they appear in its vocabulary."""

    name: str
    prefix: str
    suffix: str
    middle: str
    end: str | None = None  # its end-of-infill token, when it is not the EOS

    @property
    def tokens(self) -> tuple[str, str, str]:
        return (self.prefix, self.suffix, self.middle)


# Looked up in this order. A `<fim_pad>` (StarCoder, Qwen) is not needed: rows are padded by the
# collator with the pad token, and there is no document-level FIM here that would pad a piece.
FAMILIES = (
    Family("StarCoder/SantaCoder", "<fim_prefix>", "<fim_suffix>", "<fim_middle>"),
    Family("Qwen2.5-Coder", "<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),
    # CodeLlama's vocabulary spells them with SentencePiece's word marker; other models copy
    # the names without it.
    Family("CodeLlama", "▁<PRE>", "▁<SUF>", "▁<MID>", end="▁<EOT>"),
    Family("CodeLlama-style", "<PRE>", "<SUF>", "<MID>", end="<EOT>"),
    Family("DeepSeek-Coder", "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"),
)


@attrs.frozen
class Sentinels:
    """The ids a FIM row is assembled with."""

    prefix: int
    suffix: int
    middle: int
    end: int


def find_family(vocab: dict[str, int]) -> Family | None:
    """The first known FIM convention whose three sentinels are all in `vocab`."""
    return next((f for f in FAMILIES if all(t in vocab for t in f.tokens)), None)


def resolve_sentinels(keys: FimKeys, tokenizer: Any, where: str, about: str) -> Sentinels:
    """The sentinel and end ids for a dataset, or a `ConfigError` saying what to set.

    `where` is the dataset's config path (`datasets[0]`), `about` names the dataset and the
    tokenizer for the message.
    """
    vocab = tokenizer.get_vocab()
    family: Family | None = None
    if keys.fim_prefix_token is not None:  # all three: sft_validate_config checked it
        names = dict(zip(SENTINEL_KEYS, _overrides(keys), strict=True))
    else:
        family = find_family(vocab)
        if family is None:
            known = "; ".join(" ".join(f.tokens) for f in FAMILIES)
            raise plugin.ConfigError(
                [
                    plugin.Problem(
                        where,
                        f"type = 'fim' needs fill-in-the-middle tokens, and {about} has none "
                        f"of the known ones ({known})",
                        hint="set fim_prefix_token, fim_suffix_token and fim_middle_token to the "
                        "model's own FIM tokens, or add new ones to the vocabulary: tokens = "
                        "['<fim_prefix>', '<fim_suffix>', '<fim_middle>'] (new tokens start "
                        "untrained)",
                    )
                ]
            )
        names = dict(zip(SENTINEL_KEYS, family.tokens, strict=True))
    if keys.fim_end_token is not None:
        names["fim_end_token"] = keys.fim_end_token
    elif family is not None and family.end is not None and family.end in vocab:
        names["fim_end_token"] = family.end
    elif tokenizer.eos_token is not None:
        names["fim_end_token"] = tokenizer.eos_token
    else:
        raise plugin.ConfigError(
            [
                plugin.Problem(
                    f"{where}.fim_end_token",
                    f"{about} has no EOS token to end the middle with",
                    hint="set fim_end_token (or special_tokens = {eos_token = '...'})",
                )
            ]
        )
    for name, token in names.items():
        if token not in vocab:
            raise plugin.ConfigError(
                [
                    plugin.Problem(
                        f"{where}.{name}",
                        f"{token!r} is not a token of {about}",
                        hint=f"name one of its tokens, or add it: tokens = [{token!r}]",
                    )
                ]
            )
    ids = [vocab[names[k]] for k in (*SENTINEL_KEYS, "fim_end_token")]
    return Sentinels(*ids)


def _overrides(keys: FimKeys) -> tuple[str | None, str | None, str | None]:
    return (keys.fim_prefix_token, keys.fim_suffix_token, keys.fim_middle_token)


# ------------------------------------------------------------------------------------------
# the split: seeded by the text, so preprocessing is reproducible and its cache valid
# ------------------------------------------------------------------------------------------


@attrs.frozen
class Draw:
    """The random choices for one row, all taken from one hash of the seed and the row's text.

    Not `random.Random`: a hash is the same on every Python version and in every worker
    process, whatever order the rows are rendered in. Identical texts get identical choices.
    """

    fim: float  # in [0, 1): FIM when below fim_rate
    spm: float  # in [0, 1): SPM when below fim_spm_rate
    cuts: tuple[int, int]  # 0 <= cuts[0] <= cuts[1] <= the text's length

    @classmethod
    def of(cls, seed: int, text: str, *more: str) -> Draw:
        """The choices for `text` (the cuts are positions in it), hashed with any `more`."""
        # json.dumps: an unambiguous encoding of the parts (and valid even for lone surrogates).
        digest = hashlib.sha256(json.dumps([seed, text, *more]).encode()).digest()
        fim, spm, first, second = struct.unpack("<4Q", digest)
        length = len(text) + 1
        low, high = sorted((first % length, second % length))
        return cls(fim / 2**64, spm / 2**64, (low, high))


# ------------------------------------------------------------------------------------------
# the prompt strategy
# ------------------------------------------------------------------------------------------


def render_fim(ds: Any, tokenizer: Any, config: Any) -> Callable[[dict[str, Any]], Any]:
    """The `fim` prompt strategy's factory: a renderer for the rows of one dataset."""
    keys: FimKeys = ds.section(FimKeys)
    seed: int = config.seed
    eos = tokenizer.eos_token or ""
    plain_only = keys.fim_split == "random" and keys.fim_rate == 0
    # fim_rate = 0 never uses a sentinel, so it runs on any tokenizer (a completion baseline).
    sentinels = (
        None
        if plain_only
        else resolve_sentinels(keys, tokenizer, _where(ds, config), _about(ds, config))
    )
    lead = _leading_special_ids(tokenizer)

    def fim_sample(prefix: str, middle: str, suffix: str, spm: bool) -> plugin.Tokenized:
        # A Tokenized, not a Rendered: each piece is encoded on its own, as bigcode's Megatron
        # FIM (StarCoder) and CodeLlama's training did, and joined with the sentinels' ids. No
        # dependence on whether a sentinel written into text is split out as one token (an
        # override may name a vocabulary entry that is not an added token), no BPE merge or
        # SentencePiece space across a piece boundary, and labels exact to the token.
        assert sentinels is not None
        encoded = tokenizer([prefix, middle, suffix], add_special_tokens=False, verbose=False)
        pre, mid, suf = encoded["input_ids"]
        # SPM as StarCoder and CodeLlama were trained on it (the FIM paper's variant with the
        # prefix sentinel first): the prefix, untrained, runs straight into the middle.
        if spm:
            context = [*lead, sentinels.prefix, sentinels.suffix, *suf, sentinels.middle, *pre]
        else:
            context = [*lead, sentinels.prefix, *pre, sentinels.suffix, *suf, sentinels.middle]
        target = [*mid, sentinels.end]
        return plugin.Tokenized(
            input_ids=tuple(context + target),
            labels=(plugin.IGNORE_INDEX,) * len(context) + tuple(target),
        )

    def render_random(row: dict[str, Any]) -> plugin.Tokenized | plugin.Rendered:
        text = str(plugin.require(row, keys.fim_field, key="fim_field"))
        draw = Draw.of(seed, text)
        if draw.fim < keys.fim_rate:
            _check_unicode(text, keys.fim_field)
            low, high = draw.cuts
            spm = draw.spm < keys.fim_spm_rate
            return fim_sample(text[:low], text[low:high], text[high:], spm)
        # Left to right, every token trained, long texts split: what `completion` does.
        full = text + eos
        return plugin.Rendered(
            text=full, spans=((0, len(full)),), add_special_tokens=True, split_long=True
        )

    def render_fields(row: dict[str, Any]) -> plugin.Tokenized:
        pieces = []
        for name in ("fim_prefix_field", "fim_middle_field", "fim_suffix_field"):
            field = getattr(keys, name)
            pieces.append(str(plugin.require(row, field, key=name)))
            _check_unicode(pieces[-1], field)
        prefix, middle, suffix = pieces
        spm = Draw.of(seed, prefix, middle, suffix).spm < keys.fim_spm_rate
        return fim_sample(prefix, middle, suffix, spm)

    return render_fields if keys.fim_split == "fields" else render_random


def _check_unicode(text: str, field: str) -> None:
    # Rendered text is checked by the core; pieces of a Tokenized are encoded here, and the
    # Rust tokenizer refuses a lone surrogate ("\ud800" in JSON) with a TypeError.
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise plugin.RowError(
            "invalid text",
            f"the text holds a lone surrogate {text[exc.start]!a}, which is not Unicode text",
            field,
        ) from None


def _leading_special_ids(tokenizer: Any) -> list[int]:
    """The ids the tokenizer puts before a text it encodes with its special tokens (its BOS,
    if it adds one), so a FIM row starts as a completion row does."""
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start : start + len(bare)] == bare:
            return list(full[:start])
    return []


def _where(ds: Any, config: Any) -> str:
    for group in ("datasets", "test_datasets"):
        for index, entry in enumerate(getattr(config, group)):
            if entry is ds:
                return f"{group}[{index}]"
    return "datasets[]"


def _about(ds: Any, config: Any) -> str:
    return f"the tokenizer of {config.tokenizer_config or config.base_model} (dataset {ds.path})"


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def dataset_problems(keys: FimKeys, where: str) -> list[plugin.Problem]:
    """What is wrong with one `type = "fim"` dataset's keys (`where`: its config path)."""
    problems = []
    given = {k: v for k, v in zip(SENTINEL_KEYS, _overrides(keys), strict=True) if v is not None}
    if given and len(given) < len(SENTINEL_KEYS):
        named_given = " and ".join(given)
        for name in SENTINEL_KEYS:
            if name not in given:
                problems.append(
                    plugin.Problem(
                        f"{where}.{name}",
                        f"not set, though {named_given} {'is' if len(given) == 1 else 'are'}: "
                        "the three FIM tokens are set together or not at all",
                        hint=f"set {name} too, or remove {named_given} to use the FIM tokens "
                        "found in the tokenizer",
                    )
                )
    named = {**given, "fim_end_token": keys.fim_end_token}
    for name, token in named.items():
        if token == "":
            problems.append(plugin.Problem(f"{where}.{name}", "is empty; name a token"))
    if len(given) == len(SENTINEL_KEYS) and len(set(given.values())) < len(given):
        problems.append(
            plugin.Problem(
                f"{where}.fim_prefix_token",
                f"the three FIM tokens must differ, found {list(given.values())}",
            )
        )
    unused: list[tuple[str, str]] = []
    if keys.fim_split == "fields":
        why = "with fim_split = 'fields' (every row is trained as FIM, its pieces from fields)"
        unused += [(k, why) for k in ("fim_field", "fim_rate") if _changed(keys, k)]
    else:
        why = "with fim_split = 'random' (it names a field for fim_split = 'fields')"
        fields = ("fim_prefix_field", "fim_middle_field", "fim_suffix_field")
        unused += [(k, why) for k in fields if _changed(keys, k)]
        if keys.fim_rate == 0:
            why = "with fim_rate = 0 (no row is trained as FIM)"
            unused += [(k, why) for k in ("fim_spm_rate", *named) if _changed(keys, k)]
    problems += [
        plugin.Problem(
            f"{where}.{name}",
            f"has no effect {why}",
            hint=f"remove {name}",
            warning=True,
        )
        for name, why in unused
    ]
    return problems


def _changed(keys: FimKeys, name: str) -> bool:
    return bool(getattr(keys, name) != getattr(DEFAULTS, name))


# ------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------


@plugin.hookimpl
def sft_config_keys() -> list[plugin.ConfigKeys]:
    return [plugin.ConfigKeys(FimKeys, scope="dataset")]


@plugin.hookimpl
def sft_validate_config(config: Any) -> Sequence[plugin.Problem]:
    problems = []
    for group in ("datasets", "test_datasets"):
        for index, ds in enumerate(getattr(config, group)):
            if ds.type == "fim":
                problems += dataset_problems(ds.section(FimKeys), f"{group}[{index}]")
    return problems


@plugin.hookimpl
def sft_register_prompt_strategies(register: Callable[[plugin.PromptStrategy], None]) -> None:
    register(
        plugin.PromptStrategy(
            "fim",
            render_fim,
            "code rows cut into prefix/middle/suffix, trained as fill-in-the-middle (only the "
            "middle and EOS trained) with probability fim_rate, else as plain completion",
        )
    )
