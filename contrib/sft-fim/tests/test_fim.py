"""sft-fim's tests, on the fixtures sft's pytest plugin provides (sft_config, sft_prepare, ...)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from sft_fim import FAMILIES, FimKeys, find_family, render_fim, resolve_sentinels

from sft import plugin
from sft.testing import listed_plugins

STARCODER = ["<fim_prefix>", "<fim_suffix>", "<fim_middle>"]
EOS = "<|endoftext|>"
CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\n\nprint(os.getcwd())\n",
    "x = [n for n in range(100) if n % 3 == 0]\n",
    "while True:\n    break\n",
]
ROWS = [{"text": code} for code in CODE]
CONFIG = """
base_model = "{model}"
shuffle_merged_datasets = false

[[datasets]]
path = "{{tmp}}/data.jsonl"
type = "fim"
"""
# The same on the fixtures' default model, whose ChatML tokenizer has no FIM tokens.
ON_THE_DEFAULT_MODEL = CONFIG.replace('base_model = "{model}"\n', "").replace("{{tmp}}", "{tmp}")


def build_fim_tokenizer(**kwargs):
    """A tiny tokenizer with StarCoder's FIM tokens, EOS <|endoftext|> and (by default) no BOS."""
    from sft.testing import build_tokenizer

    options = {"eos_token": EOS, "bos_token": None, **kwargs}
    return build_tokenizer(special_tokens=[*STARCODER, "<fim_pad>"], **options)


@pytest.fixture(scope="module")
def fim_tokenizer():
    return build_fim_tokenizer()


@pytest.fixture(scope="module")
def fim_model_dir(tmp_path_factory, fim_tokenizer):
    """A tiny model whose tokenizer has StarCoder's FIM tokens (and EOS <|endoftext|>)."""
    from sft.testing import build_model

    directory = tmp_path_factory.mktemp("fim-model")
    build_model(fim_tokenizer).save_pretrained(directory)
    fim_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def fim_config(sft_config, fim_model_dir):
    """`fim_config(extra_dataset_keys, *overrides, rows=ROWS)` on the FIM tokenizer's model."""

    def make(extra: str = "", *overrides: str, rows=ROWS):
        text = CONFIG.format(model=fim_model_dir) + extra
        return sft_config(text, *overrides, rows=rows)

    return make


def context_and_target(tokenizer, row) -> tuple[str, str]:
    """The untrained head and the trained tail of a row, checking that they are exactly that:
    every label before the first trained token is -100, every one from it on is its token."""
    ids, labels = row["input_ids"], row["labels"]
    start = next(i for i, label in enumerate(labels) if label != plugin.IGNORE_INDEX)
    assert labels[:start] == [plugin.IGNORE_INDEX] * start
    assert labels[start:] == ids[start:]
    return tokenizer.decode(ids[:start]), tokenizer.decode(ids[start:])


def test_the_plugin_is_found_through_its_entry_point(sft_plugins):
    assert sft_plugins.records["fim"].package == "sft-fim"
    assert sft_plugins.prompt_strategies().owner("fim") == "fim"
    row = listed_plugins()["fim"]
    assert row["provides"]["prompt_strategies"] == ["fim"] and row["status"] == "ok"
    assert {"fim_field", "fim_rate", "fim_spm_rate", "fim_prefix_token"} <= set(
        row["provides"]["dataset keys"]
    )


def test_psm_trains_only_the_middle_and_eos(fim_config, sft_prepare, fim_tokenizer):
    rows = sft_prepare(fim_config("fim_rate = 1.0"))
    assert len(rows) == len(CODE)
    cut_inside = 0
    for code, row in zip(CODE, rows, strict=True):
        context, target = context_and_target(fim_tokenizer, row)
        assert context.startswith("<fim_prefix>") and context.endswith("<fim_middle>")
        prefix, suffix = context[len("<fim_prefix>") : -len("<fim_middle>")].split("<fim_suffix>")
        assert target.endswith(EOS)
        middle = target.removesuffix(EOS)
        assert prefix + middle + suffix == code
        cut_inside += all((prefix, middle, suffix))
    assert cut_inside >= 2  # the cuts are really inside the text, not only at its ends


def test_spm_puts_the_suffix_first_and_the_prefix_right_before_the_middle(
    fim_config, sft_prepare, fim_tokenizer
):
    rows = sft_prepare(fim_config("fim_rate = 1.0\nfim_spm_rate = 1.0"))
    for code, row in zip(CODE, rows, strict=True):
        context, target = context_and_target(fim_tokenizer, row)
        assert context.startswith("<fim_prefix><fim_suffix>")
        suffix, prefix = context.removeprefix("<fim_prefix><fim_suffix>").split("<fim_middle>")
        middle = target.removesuffix(EOS)  # the prefix, though it runs into it, is not trained
        assert target == middle + EOS and prefix + middle + suffix == code


def test_fim_rate_zero_trains_every_token_like_completion(sft_config, sft_prepare, sft_tokenizer):
    # The default test model has no FIM tokens: fim_rate = 0 never needs them.
    text = ON_THE_DEFAULT_MODEL
    fim = sft_prepare(sft_config(text + "fim_rate = 0.0", rows=ROWS))
    completion = sft_prepare(sft_config(text.replace('"fim"', '"completion"'), rows=ROWS))
    assert fim["input_ids"] == completion["input_ids"]
    assert fim["labels"] == completion["labels"] == fim["input_ids"]
    assert [sft_tokenizer.decode(ids) for ids in fim["input_ids"]] == [
        code + "<|im_end|>" for code in CODE
    ]


def test_rates_between_zero_and_one_mix_the_forms(fim_config, sft_prepare, fim_tokenizer):
    rows = [{"text": f"value_{n} = {n} * {n}\n"} for n in range(40)]
    prepared = sft_prepare(fim_config("fim_rate = 0.5\nfim_spm_rate = 0.5", rows=rows))
    starts = [fim_tokenizer.decode(ids[:2]) for ids in prepared["input_ids"]]
    spm = sum(s == "<fim_prefix><fim_suffix>" for s in starts)
    psm = sum(s.startswith("<fim_prefix>") for s in starts) - spm
    plain = sum(not s.startswith("<fim_prefix>") for s in starts)
    assert spm and psm and plain and spm + psm + plain == 40
    assert 10 <= plain <= 30


def test_the_split_is_the_same_for_the_same_seed_and_differs_for_another(fim_config, fim_tokenizer):
    def render_all(config):
        render = render_fim(config.datasets[0], fim_tokenizer, config)
        return [render(row) for row in ROWS]

    first = render_all(fim_config("fim_rate = 1.0"))
    assert first == render_all(fim_config("fim_rate = 1.0"))
    assert all(isinstance(sample, plugin.Tokenized) for sample in first)
    assert render_all(fim_config("fim_rate = 1.0", "seed=7")) != first


def test_explicit_prefix_middle_and_suffix_fields(fim_config, sft_prepare, fim_tokenizer):
    rows = [
        {"before": "def square(x):\n    return ", "hole": "x * x", "after": "\n"},
        {"before": "", "hole": "import sys", "after": "\nprint(sys.argv)\n"},
    ]
    keys = 'fim_split = "fields"\nfim_prefix_field = "before"\nfim_middle_field = "hole"\n'
    keys += 'fim_suffix_field = "after"\n'
    prepared = sft_prepare(fim_config(keys, rows=rows))
    for source, row in zip(rows, prepared, strict=True):
        context, target = context_and_target(fim_tokenizer, row)
        assert context == f"<fim_prefix>{source['before']}<fim_suffix>{source['after']}<fim_middle>"
        assert target == source["hole"] + EOS


def test_a_tokenizer_without_fim_tokens_is_refused_with_what_to_set(
    sft_config, sft_prepare, sft_model_dir
):
    text = ON_THE_DEFAULT_MODEL
    with pytest.raises(plugin.ConfigError) as error:
        sft_prepare(sft_config(text, rows=ROWS))
    (problem,) = error.value.problems
    assert problem.path == "datasets[0]"
    assert "type = 'fim' needs fill-in-the-middle tokens" in problem.message
    assert str(sft_model_dir) in problem.message and "data.jsonl" in problem.message
    assert "<fim_prefix> <fim_suffix> <fim_middle>" in problem.message
    assert "fim_prefix_token" in problem.hint and "tokens = ['<fim_prefix>'" in problem.hint


def with_tokens(tokenizer, tokens):
    """The tokenizer as `tokens = [...]` in a config makes it (for decoding what it made)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(tokens)
    return tokenizer


def test_fim_tokens_added_by_the_config_are_found(sft_config, sft_prepare, sft_tokenizer):
    text = ON_THE_DEFAULT_MODEL
    text = f"tokens = {json.dumps(STARCODER)}\n" + text + "fim_rate = 1.0\n"
    row = sft_prepare(sft_config(text, rows=ROWS[:1]))[0]
    context, target = context_and_target(with_tokens(sft_tokenizer, STARCODER), row)
    assert context.startswith("<fim_prefix>") and context.endswith("<fim_middle>")
    assert target.endswith("<|im_end|>")


def test_token_overrides_name_the_sentinels(sft_config, sft_prepare, sft_tokenizer):
    text = ON_THE_DEFAULT_MODEL
    text = 'tokens = ["<P>", "<S>", "<M>", "<END>"]\n' + text + "fim_rate = 1.0\n"
    text += 'fim_prefix_token = "<P>"\nfim_suffix_token = "<S>"\nfim_middle_token = "<M>"\n'
    row = sft_prepare(sft_config(text + 'fim_end_token = "<END>"\n', rows=ROWS[:1]))[0]
    context, target = context_and_target(
        with_tokens(sft_tokenizer, ["<P>", "<S>", "<M>", "<END>"]), row
    )
    assert context.startswith("<P>") and "<S>" in context and context.endswith("<M>")
    assert target.endswith("<END>")

    with pytest.raises(plugin.ConfigError) as error:
        sft_prepare(sft_config(text + 'fim_end_token = "<STOP>"\n', rows=ROWS[:1]))
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].fim_end_token"
    assert "'<STOP>' is not a token of the tokenizer" in problem.message
    assert "tokens = ['<STOP>']" in problem.hint


def test_token_overrides_are_all_or_none(fim_config):
    with pytest.raises(plugin.ConfigError) as error:
        fim_config('fim_prefix_token = "<fim_prefix>"')
    paths = {p.path for p in error.value.problems}
    assert paths == {"datasets[0].fim_suffix_token", "datasets[0].fim_middle_token"}
    assert "set together or not at all" in error.value.problems[0].message


def test_a_rate_outside_zero_to_one_is_refused_with_its_path(fim_config):
    with pytest.raises(plugin.ConfigError) as error:
        fim_config("fim_rate = 1.5\nfim_spm_rate = -0.1")
    paths = {p.path for p in error.value.problems}
    assert paths == {"datasets[0].fim_rate", "datasets[0].fim_spm_rate"}


def test_keys_that_change_nothing_are_warned_about(fim_config):
    config = fim_config('fim_split = "fields"\nfim_rate = 0.5')
    (warning,) = config.warnings
    assert warning.path == "datasets[0].fim_rate" and "has no effect" in warning.message


def test_the_fim_keys_belong_to_fim_datasets_only(sft_config, fim_model_dir):
    text = CONFIG.format(model=fim_model_dir).replace('type = "fim"', 'type = "completion"')
    with pytest.raises(plugin.ConfigError) as error:
        sft_config(text + "fim_rate = 0.5", rows=ROWS)
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].fim_rate"
    assert "belongs to dataset type 'fim' (plugin fim)" in problem.message


def test_a_row_without_the_code_field_is_refused_with_its_row(fim_config, sft_prepare):
    rows = [*ROWS, {"content": "print(1)\n"}]
    with pytest.raises(plugin.DataError) as error:
        sft_prepare(fim_config(rows=rows))
    assert error.value.row == len(rows) and "missing field 'text'" in str(error.value)
    kept = sft_prepare(fim_config("", "invalid_rows=skip", rows=rows))
    assert len(kept) == len(ROWS)


def test_a_field_no_row_has_is_blamed_on_fim_field(fim_config, sft_prepare):
    with pytest.raises(plugin.ConfigError) as error:
        sft_prepare(fim_config(rows=[{"content": "x = 1\n"}, {"content": "y = 2\n"}]))
    (problem,) = error.value.problems
    assert problem.path == "datasets[0].fim_field" and "fails on every row" in problem.message


def test_code_that_is_not_unicode_is_a_bad_row_not_a_crash(fim_config, sft_prepare):
    rows = [*ROWS, {"text": "s = '\ud800'\n"}]  # a lone surrogate passes json.loads
    with pytest.raises(plugin.DataError) as error:
        sft_prepare(fim_config("fim_rate = 1.0", rows=rows))
    assert error.value.row == len(rows) and "lone surrogate" in str(error.value)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_each_known_convention_is_found_in_the_vocabulary(family):
    from sft.testing import build_tokenizer

    extra = [family.end] if family.end else []
    tokenizer = build_tokenizer(special_tokens=[*family.tokens, *extra], eos_token=EOS)
    vocab = tokenizer.get_vocab()
    assert find_family(vocab) == family
    ids = resolve_sentinels(FimKeys(), tokenizer, "datasets[0]", "the tokenizer")
    assert (ids.prefix, ids.suffix, ids.middle) == tuple(vocab[t] for t in family.tokens)
    assert ids.end == vocab[family.end or EOS]


def test_a_bos_the_tokenizer_adds_starts_the_row_untrained(fim_config):
    config = fim_config("fim_rate = 1.0")
    tokenizer = build_fim_tokenizer(bos_token="<s>", add_bos=True)
    sample = render_fim(config.datasets[0], tokenizer, config)(ROWS[0])
    prefix_id = tokenizer.convert_tokens_to_ids("<fim_prefix>")
    assert sample.input_ids[:2] == (tokenizer.bos_token_id, prefix_id)
    assert sample.labels[:2] == (plugin.IGNORE_INDEX, plugin.IGNORE_INDEX)


def test_the_readme_example_config_prepares(sft_config, sft_prepare, fim_model_dir, tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    example = readme.split("```toml\n", 1)[1].split("```", 1)[0]
    assert example.startswith("base_model = ")  # replaced by the tiny model with FIM tokens
    example = example.split("\n", 1)[1].replace('path = "', f'path = "{tmp_path}/')
    (tmp_path / "code.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    infill = {"prefix": "def one():\n    return ", "middle": "1", "suffix": "\n"}
    (tmp_path / "infill.jsonl").write_text(json.dumps(infill) + "\n")
    config = sft_config(f'base_model = "{fim_model_dir}"\n{example}')
    assert config.warnings == ()
    assert len(sft_prepare(config)) == len(ROWS) + 1
