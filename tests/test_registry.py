from __future__ import annotations

import pytest

from sft.components import AttentionBackend
from sft.registry import KINDS, Registry, UnknownComponentError


def make_registry() -> Registry[AttentionBackend]:
    registry: Registry[AttentionBackend] = Registry(KINDS["attention_backends"])
    registry.add(AttentionBackend("sdpa", "sdpa", "mask"), plugin="sdpa")
    registry.add(
        AttentionBackend("flash_attention_2", "flash_attention_2", "varlen", aliases=("flash",)),
        plugin="flash_attn",
    )
    return registry


def test_lookup_by_name_and_alias_remembers_the_plugin():
    registry = make_registry()
    assert registry.get("flash").name == "flash_attention_2"
    assert registry.owner("flash") == "flash_attn"
    assert registry.owner("sdpa") == "sdpa"
    assert registry.names() == ["flash_attention_2", "sdpa"]


def test_unknown_name_lists_installed_choices_and_a_did_you_mean():
    registry = make_registry()
    with pytest.raises(UnknownComponentError) as error:
        registry.get("sdpaa")
    message = str(error.value)
    assert "did you mean 'sdpa'" in message
    assert "flash_attention_2, sdpa" in message


def test_unknown_name_mentions_broken_plugins():
    registry = make_registry()
    registry.broken_plugins = {"liger": "cannot import liger_kernel"}
    assert "liger (cannot import liger_kernel)" in registry.unknown_message("liger_rms")


def test_alias_clashing_with_a_name_is_a_conflict():
    registry = make_registry()
    registry.add(AttentionBackend("other", "eager", "mask", aliases=("sdpa",)), plugin="other")
    assert "'sdpa'" in str(registry.conflicts["sdpa"])
    assert "other" not in registry
