"""The liger plugin applies exactly the kernels its keys ask for (liger itself needs a GPU:
here its apply functions are stand-ins with the real signatures of liger-kernel 0.8)."""

from __future__ import annotations

import inspect
import sys
import types

import pytest

from sft.errors import ModelError
from sft.plugins.liger import LigerKeys, liger_kwargs, sft_patch_model


def apply_liger_kernel_to_gemma(
    rope=True,
    cross_entropy=False,
    fused_linear_cross_entropy=True,
    rms_norm=True,
    geglu=True,
    model=None,
):
    """liger's signature: GEGLU models take `geglu`, not `swiglu`."""


def apply_liger_kernel_to_llama(
    rope=True,
    cross_entropy=False,
    fused_linear_cross_entropy=True,
    rms_norm=True,
    swiglu=True,
    model=None,
):
    """liger's signature: no LayerNorm kernel."""


def apply_liger_kernel_to_gemma3(
    rope=True,
    cross_entropy=False,
    fused_linear_cross_entropy=True,
    layer_norm=True,
    rms_norm=True,
    geglu=True,
    model=None,
):
    """liger's signature: LayerNorm (the vision tower) and GEGLU."""


def params(function):
    return inspect.signature(function).parameters


def test_glu_off_on_gemma_passes_geglu_false_instead_of_leaving_liger_default_on():
    kwargs, unmatched = liger_kwargs(
        LigerKeys(liger_rms_norm=True), params(apply_liger_kernel_to_gemma)
    )
    assert kwargs == {
        "rope": False,
        "cross_entropy": False,
        "fused_linear_cross_entropy": False,
        "rms_norm": True,
        "geglu": False,
    }
    assert unmatched == []


def test_glu_on_gemma_is_geglu_and_on_llama_swiglu():
    keys = LigerKeys(liger_glu_activation=True)
    assert liger_kwargs(keys, params(apply_liger_kernel_to_gemma))[0]["geglu"] is True
    llama, _ = liger_kwargs(keys, params(apply_liger_kernel_to_llama))
    assert llama["swiglu"] is True and "geglu" not in llama


def test_layer_norm_is_passed_where_liger_has_it_and_reported_where_not():
    keys = LigerKeys(liger_layer_norm=True)
    kwargs, unmatched = liger_kwargs(keys, params(apply_liger_kernel_to_gemma3))
    assert kwargs["layer_norm"] is True and unmatched == []
    kwargs, unmatched = liger_kwargs(keys, params(apply_liger_kernel_to_llama))
    assert unmatched == ["liger_layer_norm"] and not any(kwargs.values())


@pytest.fixture
def fake_liger(monkeypatch):
    """liger_kernel with the apply table; records each call."""
    calls = []

    def recording(function):
        def apply(model=None, **kwargs):
            calls.append((function.__name__, kwargs))

        apply.__signature__ = inspect.signature(function)
        return apply

    table = {
        "gemma": recording(apply_liger_kernel_to_gemma),
        "llama": recording(apply_liger_kernel_to_llama),
    }
    package = types.ModuleType("liger_kernel")
    transformers = types.ModuleType("liger_kernel.transformers")
    monkey_patch = types.ModuleType("liger_kernel.transformers.monkey_patch")
    monkey_patch.MODEL_TYPE_TO_APPLY_LIGER_FN = table
    for name, module in (
        ("liger_kernel", package),
        ("liger_kernel.transformers", transformers),
        ("liger_kernel.transformers.monkey_patch", monkey_patch),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    return calls


class FakeConfig:
    def __init__(self, **keys):
        self.keys = LigerKeys(**keys)

    def section(self, cls):
        return self.keys


def model_of(model_type):
    return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))


def test_patch_model_calls_liger_with_every_switch_of_the_architecture(fake_liger):
    sft_patch_model(model_of("gemma"), FakeConfig(liger_rope=True, liger_layer_norm=False))
    assert fake_liger == [
        (
            "apply_liger_kernel_to_gemma",
            {
                "rope": True,
                "cross_entropy": False,
                "fused_linear_cross_entropy": False,
                "rms_norm": False,
                "geglu": False,
            },
        )
    ]


def test_patch_model_refuses_a_kernel_the_architecture_lacks(fake_liger):
    with pytest.raises(ModelError, match="liger_layer_norm would have no effect") as caught:
        sft_patch_model(model_of("llama"), FakeConfig(liger_layer_norm=True, liger_rope=True))
    assert "'llama' models" in str(caught.value) and fake_liger == []
