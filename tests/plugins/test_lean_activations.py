"""lean_activations: the same outputs and gradients as the model's own modules, fewer tensors kept
for backward, and only on modules that compute the standard formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from sft.errors import ConfigError, ModelError
from sft.plugins import lean_activations as lean
from sft.plugins.lean_activations import recompute
from sft.testing import build_model


def _batch(model, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=generator)
    return {"input_ids": ids, "labels": ids}


def _loaded(tiny_project, *overrides):
    """The tiny model as `sft run` loads it (plugins' patches) with a LoRA adapter."""
    from sft.manager import get_plugins
    from sft.model import apply_adapter, load_model
    from sft.tokenizer import load_tokenizer

    config = tiny_project(
        "adapter=lora", "lora_r=4", "lora_target_linear=true", "lora_dropout=0", *overrides
    )
    plugins = get_plugins()
    model = load_model(config, load_tokenizer(config, plugins), plugins)
    torch.manual_seed(0)  # the same LoRA weights in every model
    model = apply_adapter(model, config)
    with torch.no_grad():  # B starts at zero; A's gradient (through the kept inputs) needs B
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    model.train()
    return model


def _saved_shapes(model, batch) -> list[tuple[int, ...]]:
    """The shapes of every tensor autograd keeps for backward during one forward."""
    shapes = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch).loss.backward()
    return shapes


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_fine_tune_outputs_equal_and_gradients_match(tokenizer, dtype):
    model = build_model(tokenizer).to(dtype).train()
    patched = copy.deepcopy(model)
    counts = lean.patch_model(patched, lean.OPS)
    assert counts == {"rms_norm": 5, "swiglu": 2, "rope": 2}  # 2 layers x 2 norms + final
    batch = _batch(model)
    reference, candidate = model(**batch), patched(**batch)
    assert torch.equal(reference.logits, candidate.logits)
    reference.loss.backward()
    candidate.loss.backward()
    expected, got = _grads(model), _grads(patched)
    assert expected.keys() == got.keys()
    assert any("norm" in n for n in got)  # the norms' weight gradient is computed too
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        error = (expected[name] - got[name]).abs().max() / scale
        assert error < tolerance, name


def test_lora_run_keeps_fewer_tensors_with_the_same_gradients(tiny_project, monkeypatch):
    rebuilt = []
    real = recompute._rebuild
    monkeypatch.setattr(recompute, "_rebuild", lambda p: rebuilt.append(p) or real(p))
    off = _loaded(tiny_project, "lean_activations=false")
    on = _loaded(tiny_project)
    assert on.base_model.model._sft_lean_activations == {"rms_norm": 5, "swiglu": 2, "rope": 2}
    batch = _batch(on)
    saved_off, saved_on = _saved_shapes(off, batch), _saved_shapes(on, batch)
    assert on.base_model.model._sft_lean_activations["lora"] == 2 * 7  # patched at first run
    tokens = batch["input_ids"].numel()

    def activations(saved: list, width: int) -> int:
        return sum(bool(s) and s[-1] == width and math.prod(s) == tokens * width for s in saved)

    wide = on.config.intermediate_size
    # Per layer, autograd keeps SiLU's input and output, the up projection and their product
    # (down_proj's LoRA input); lean keeps the gate and up projections only.
    assert activations(saved_off, wide) == 4 * 2
    assert activations(saved_on, wide) == 2 * 2
    # the norms' outputs (q/k/v's and gate/up's LoRA input) are recomputed, not kept
    hidden = on.config.hidden_size
    assert activations(saved_on, hidden) <= activations(saved_off, hidden) - 2 * 2
    # per layer: q/k/v's and gate/up's A rebuild their norm's output, down's A the product
    assert len(rebuilt) == 2 * 6
    expected, got = _grads(off), _grads(on)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=1e-4, atol=1e-6), name


def test_gradient_checkpointing_gives_the_same_gradients(tiny_project):
    off = _loaded(tiny_project, "lean_activations=false", "gradient_checkpointing=true")
    on = _loaded(tiny_project, "gradient_checkpointing=true")
    batch = _batch(on, seed=1)
    off(**batch).loss.backward()
    on(**batch).loss.backward()
    # checkpointed layers are recomputed anyway: LoRA keeps no recipes (they would keep the
    # norms' inputs alive)
    assert on.base_model.model.model.layers[0].mlp.up_proj._sft_recipes is False
    expected, got = _grads(off), _grads(on)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.allclose(expected[name], got[name], rtol=1e-4, atol=1e-6), name


def test_lean_class_survives_train_and_kernel_reselection(tokenizer):
    model = build_model(tokenizer)
    lean.patch_model(model, lean.OPS)
    model.train()  # transformers re-selects its hub-kernel layers' forward here
    norm = model.model.layers[0].input_layernorm
    x = torch.randn(1, 3, model.config.hidden_size, requires_grad=True)
    assert type(norm(x).grad_fn).__name__ == "RMSNormBackward"
    assert type(norm).__name__ == "LlamaRMSNorm"  # same name, a lean subclass
    mlp = model.model.layers[0].mlp
    assert type(mlp(x).grad_fn.next_functions[0][0]).__name__.startswith("MmBackward")


def test_rope_is_lean_only_inside_patched_models(tokenizer):
    patched, plain = build_model(tokenizer), build_model(tokenizer)
    lean.patch_model(patched, ["rope"])
    batch = _batch(patched)

    def node_names(model) -> set[str]:
        names, stack, seen = set(), [model(**batch).loss.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(f for f, _ in node.next_functions)
        return names

    assert "RopeBackward" in node_names(patched)
    assert "RopeBackward" not in node_names(plain)  # same model file, not patched


def test_other_formulas_keep_their_own_forward(tokenizer):
    from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm

    # Gemma: RMSNorm scales by (1 + weight), the MLP is GELU-gated; its rotary embedding is
    # the standard one.
    model = build_model(tokenizer, arch="gemma")
    assert lean.patch_model(model, lean.OPS) == {"rms_norm": 0, "swiglu": 0, "rope": 2}
    assert type(model.model.layers[0].mlp) is GemmaMLP
    assert type(model.model.norm) is GemmaRMSNorm


def test_true_on_a_model_it_cannot_change_is_an_error(tiny_project):
    from transformers import GPT2Config, GPT2LMHeadModel

    # LayerNorm, GELU MLP, learned positions: none of the three formulas
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match="lean_activations = true applies to none"):
        lean.sft_patch_model(model, tiny_project("lean_activations=true"))
    lean.sft_patch_model(model, tiny_project())  # the default: nothing to do, no error


def test_off_by_default_under_torch_compile_and_true_conflicts(tiny_project):
    assert lean._wanted(tiny_project("torch_compile=true")) == []
    assert lean._wanted(tiny_project()) == list(lean.OPS)
    assert lean._wanted(tiny_project("lean_activations=false")) == []
    with pytest.raises(ConfigError) as error:
        tiny_project("torch_compile=true", "lean_activations=true")
    assert (
        "conflicts with torch_compile"
        in {p.path: p.message for p in error.value.problems}["lean_activations"]
    )


def test_a_kernel_plugin_keeps_the_parts_it_replaces(make_config):
    dataset = '[[datasets]]\npath = "{tmp}/d.jsonl"\ntype = "completion"\n'
    norms = make_config("liger_rms_norm = true\n" + dataset, machine_checks=False)
    assert lean._wanted(norms) == ["swiglu", "rope"]  # liger's RMSNorm; the rest stays lean
    loss = make_config("liger_fused_linear_cross_entropy = true\n" + dataset, machine_checks=False)
    assert lean._wanted(loss) == list(lean.OPS)  # the loss is no part lean replaces
    make_config(  # and no conflict
        "lean_activations = true\nliger_fused_linear_cross_entropy = true\n" + dataset,
        machine_checks=False,
    )
    with pytest.raises(ConfigError) as error:
        make_config(
            "lean_activations = true\nliger_rms_norm = true\n" + dataset, machine_checks=False
        )
    message = {p.path: p.message for p in error.value.problems}["lean_activations"]
    assert "conflicts with liger_rms_norm: that kernel replaces the same rms_norm" in message


def test_a_kernel_that_does_not_name_its_parts_takes_them_all():
    from types import SimpleNamespace

    from sft.components import Kernel

    class Registry(dict):
        def owner(self, name):
            return "someone"

    kernels = Registry(
        silent=Kernel("silent", lambda: (True, ""), enabled_by=lambda c: ["silent_key"]),
        named=Kernel(
            "named",
            lambda: (True, ""),
            enabled_by=lambda c: ["rope_key"],
            replaces=lambda c: ["rope"],
        ),
        off=Kernel("off", lambda: (True, ""), enabled_by=lambda c: [], replaces=lambda c: ["rope"]),
    )
    config = SimpleNamespace(plugin_set=SimpleNamespace(kernels=lambda: kernels))
    assert lean.kernel_conflicts(config) == {
        "rms_norm": ["silent_key"],
        "swiglu": ["silent_key"],
        "rope": ["silent_key", "rope_key"],
    }


def _norm_then_lora_a(x, weight, lora_a):
    """An RMSNorm whose output is LoRA A's input, saved as the lean LoRA layer saves it."""
    h = x * 1.0
    y = lean.rms_norm(h, weight, 1e-6)
    with recompute.saving_recipes():
        out = y.reshape(-1, y.shape[-1]) @ lora_a
    return h, out


def test_a_recipe_rebuilds_the_kept_input(monkeypatch):
    rebuilt = []
    real = recompute._rebuild
    monkeypatch.setattr(recompute, "_rebuild", lambda p: rebuilt.append(p) or real(p))
    x = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.rand(8)
    lora_a = torch.randn(8, 2, requires_grad=True)
    y = lean._rms_norm_value(x, weight, 1e-6)[0]
    (y.reshape(-1, 8) @ lora_a).square().sum().backward()
    expected = (lora_a.grad.clone(), x.grad.clone())
    lora_a.grad = x.grad = None
    _, out = _norm_then_lora_a(x, weight, lora_a)
    out.square().sum().backward()
    assert len(rebuilt) == 1  # stored as a recipe, rebuilt once in backward
    assert torch.equal(lora_a.grad, expected[0])
    assert torch.allclose(x.grad, expected[1], rtol=1e-5, atol=1e-7)


def test_an_input_changed_in_place_before_backward_is_an_error():
    x = torch.randn(2, 4, 8, requires_grad=True)
    lora_a = torch.randn(8, 2, requires_grad=True)
    h, out = _norm_then_lora_a(x, torch.ones(8), lora_a)
    with torch.no_grad():
        h.add_(1.0)
    with pytest.raises(RuntimeError, match="lean_activations: a tensor needed to recompute"):
        out.sum().backward()


def test_tensors_kept_inside_still_refuse_in_place_changes():
    x = torch.randn(3, requires_grad=True)
    with recompute.saving_recipes():
        a = x * 2
        b = a.sin()  # keeps a
    with torch.no_grad():
        a.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        b.sum().backward()


def test_mlps_with_dropout_or_a_clamp_keep_their_forward(tokenizer):
    from transformers.models.llama.modeling_llama import LlamaMLP

    class ClampedMLP(LlamaMLP):  # DeepSeek-V4 style: gate and up clamped at 10
        def forward(self, x):
            gate = self.gate_proj(x).clamp(max=10.0)
            return self.down_proj(self.act_fn(gate) * self.up_proj(x).clamp(-10.0, 10.0))

    class DropoutMLP(LlamaMLP):  # Seed-OSS style: a dropout rate applied in forward
        def __init__(self, config):
            super().__init__(config)
            self.residual_dropout = 0.1

        def forward(self, x):
            out = super().forward(x)
            return torch.nn.functional.dropout(out, self.residual_dropout, self.training)

    model = build_model(tokenizer)
    model.model.layers[0].mlp = ClampedMLP(model.config).eval()
    model.model.layers[1].mlp = DropoutMLP(model.config).eval()  # eval: the same output
    assert lean.patch_mlps(model) == 0
    assert type(model.model.layers[0].mlp) is ClampedMLP
    assert type(model.model.layers[1].mlp) is DropoutMLP


def test_lora_under_autocast_runs_peft_forward(tiny_project):
    model = _loaded(tiny_project)
    model(**_batch(model))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert "AddmmBackward0" not in {type(out.grad_fn).__name__} | {
        type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None
    }


@pytest.mark.parametrize(
    ("overrides", "in_place"),
    [([], True), (["lora_dropout=0.1"], False), (["peft_use_dora=true"], False)],
)
def test_lora_update_is_added_in_place_in_the_plain_case(tiny_project, overrides, in_place):
    from peft.tuners.lora.layer import Linear

    model = _loaded(tiny_project, *overrides)
    model.eval()  # dropout off: both paths give the same value
    model(**_batch(model))  # the first forward patches the LoRA layers
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    got = layer(x)
    expected = Linear.forward(layer, x)  # peft's own
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)
    ops = {type(got.grad_fn).__name__, type(got.grad_fn.next_functions[0][0]).__name__}
    assert bool(ops & {"AddmmBackward0", "LoraLinearBackward"}) is in_place
    (got * expected.detach()).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
    grad_x, x.grad = x.grad, None
    for parameter in layer.parameters():
        parameter.grad = None
    (expected * expected.detach()).sum().backward()
    assert torch.allclose(grad_x, x.grad, rtol=1e-5, atol=1e-7)
    for name, parameter in layer.named_parameters():
        if parameter.requires_grad:
            assert torch.allclose(grads[name], parameter.grad, rtol=1e-5, atol=1e-7), name


def _peft_and_lean_gradients(layer, x, frozen):
    """Output and gradients (x's and each trainable parameter's) of `layer` on `x`, through the
    lean forward and through peft's own, with the parameters in `frozen` not trained."""
    from peft.tuners.lora.layer import Linear

    for name, parameter in layer.named_parameters():
        parameter.requires_grad_(("lora_" in name) and not any(f in name for f in frozen))
    results = []
    for forward in (layer.forward, lambda t: Linear.forward(layer, t)):
        leaf = x.detach().clone().requires_grad_(True)
        saved: list[torch.Tensor] = []

        def keep(tensor, saved=saved):
            saved.append(tensor)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = forward(leaf)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        nodes = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
        results.append((out.detach(), leaf.grad, grads, nodes, saved))
        for parameter in layer.parameters():
            parameter.grad = None
    return results


@pytest.mark.parametrize("frozen", [(), ("lora_A",), ("lora_B",)])
def test_lora_backward_adds_x_gradients_in_place_with_autograds_values(tiny_project, frozen):
    """A frozen base with LoRA: one Function whose backward adds LoRA's share of x's gradient
    into the base's in place; x's, A's and B's gradients equal autograd's over peft's forward,
    also with A or B frozen (the tensor only that gradient needs is not kept)."""
    model = _loaded(tiny_project)
    model(**_batch(model))  # the first forward patches the LoRA layers
    for module in ("mlp.down_proj", "self_attn.k_proj"):
        layer = model.base_model.model.model.layers[1].get_submodule(module)
        x = torch.randn(3, 7, layer.in_features)
        lean_run, peft_run = _peft_and_lean_gradients(layer, x, frozen)
        (out, grad_x, grads, nodes, saved), (ref, ref_x, ref_grads, _, _) = lean_run, peft_run
        assert "LoraLinearBackward" in nodes
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
        kept_x = any(t.shape == (21, layer.in_features) for t in saved)
        assert kept_x is ("lora_A" not in frozen)
        assert torch.allclose(grad_x, ref_x, rtol=1e-5, atol=1e-6)
        assert grads.keys() == ref_grads.keys() and len(grads) == 2 - len(frozen)
        for name, grad in grads.items():
            assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-6), name


def test_lora_on_a_trained_base_weight_takes_autograds_path(tiny_project):
    """A base weight that trains too (unfrozen beside LoRA) gets its gradient: that layer runs
    the in-place forward under autograd, not the frozen-base Function."""
    from peft.tuners.lora.layer import Linear

    model = _loaded(tiny_project)
    model(**_batch(model))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    layer.base_layer.weight.requires_grad_(True)
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    out = layer(x)
    nodes = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
    assert "AddmmBackward0" in nodes and "LoraLinearBackward" not in nodes
    out.square().sum().backward()
    grad = layer.base_layer.weight.grad.clone()
    layer.base_layer.weight.grad = None
    Linear.forward(layer, x).square().sum().backward()
    assert torch.allclose(grad, layer.base_layer.weight.grad, rtol=1e-5, atol=1e-6)


def test_lora_under_autocast_to_its_own_dtype_adds_in_place(tiny_project):
    from peft.tuners.lora.layer import Linear

    model = _loaded(tiny_project).to(torch.bfloat16)  # as a bf16 model under bf16 autocast
    model(**_batch(model))
    layer = model.base_model.model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        expected = Linear.forward(layer, x)
    ops = {type(f).__name__ for f, _ in out.grad_fn.next_functions if f is not None}
    assert {"AddmmBackward0", "LoraLinearBackward"} & (ops | {type(out.grad_fn).__name__})
    assert torch.allclose(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_no_entry_outlives_its_step(tiny_project):
    import gc

    model = _loaded(tiny_project)
    model(**_batch(model)).loss.backward()
    gc.collect()
    assert recompute._ENTRIES == {}


@pytest.mark.parametrize("hidden", [7, 576, 4096])
def test_fp32_cpu_norm_uses_the_fused_kernel_with_llamas_value_and_a_precise_gradient(hidden):
    """In fp32 on CPU the norm's forward is torch's fused kernel: LlamaRMSNorm's value to the
    bit. With a frozen weight (LoRA) its input gradient is the short fp32 formula: as close to
    the float64 gradient as the model's own backward is."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(hidden)
    norm = LlamaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    norm.weight.requires_grad_(False)
    x = (torch.randn(3, 50, hidden) * 4).requires_grad_()
    with torch.no_grad():
        assert lean._fused_fp32_cpu(x, norm.weight)
        assert torch.equal(lean._rms_norm_value(x, norm.weight, 1e-6)[0], norm(x))
    grad = torch.randn(3, 50, hidden)
    (own,) = torch.autograd.grad(norm(x), x, grad)
    out = lean.function("rms_norm").apply(x, norm.weight, 1e-6)
    assert torch.equal(out, norm(x))
    (got,) = torch.autograd.grad(out, x, grad)
    x64 = x.detach().double().requires_grad_()
    exact = norm.weight.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6)
    (expected,) = torch.autograd.grad(exact, x64, grad.double())
    own_error = (own.double() - expected).abs().max()
    assert (got.double() - expected).abs().max() <= 2 * own_error + 1e-7
