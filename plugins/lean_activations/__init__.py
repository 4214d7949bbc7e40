"""`lean_activations`: RMSNorm, the SwiGLU product and rotary embeddings that keep only their
inputs for the backward pass, and LoRA updates added in place, in plain PyTorch (any device).

Autograd keeps every intermediate of these elementwise ops: the normalised activations of each
RMSNorm, SiLU's output beside the gate and up projections, the rotated copy of q and k. Here each
op is one `torch.autograd.Function` that saves its inputs (and RMSNorm's per-token scale) and
recomputes the rest in backward, which costs a few elementwise passes and no matmul. Outputs are
bit-identical to the model's own; gradients equal autograd's to rounding.

Applied to the modules that compute exactly these formulas, checked on the loaded model rather
than by architecture name: each RMSNorm and each SwiGLU MLP is run on random inputs at three
scales beside the replacement (modules with dropout are left alone), each model file's
`apply_rotary_pos_emb` on the model's own cos/sin; a module whose output differs (Gemma's
`1 + weight` norm, GELU MLPs, clamped gates, partial rotary) keeps its own forward. Kernel
plugins (liger's, a third party's) may replace the same modules: a part a kernel replaces
(`Kernel.replaces`) is left to it, and a kernel that does not say which parts leaves none.

The outputs of the norms and of the SwiGLU product are the inputs LoRA keeps for its weight
gradient; those are rebuilt in backward from what the lean ops keep anyway (`recompute`). peft's
LoRA layers add their update into the base output in place (`lora`).
"""

from __future__ import annotations

import inspect
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs

from sft import hookimpl
from sft.components import ConfigKeys
from sft.config.schema import Config, key
from sft.errors import ModelError, Problem
from sft.plugins.lean_activations import lora, recompute

OPS = ("rms_norm", "swiglu", "rope")


@attrs.frozen
class LeanKeys:
    lean_activations: bool | None = key(
        None,
        doc="RMSNorm, SwiGLU and RoPE keep only their inputs for backward and recompute the "
        "rest, LoRA adds its update in place (less memory, no extra matmul). Default: on for "
        "the modules that compute these exact formulas (off under torch_compile; a part a "
        "kernel plugin such as liger replaces is left to it); false: the "
        "model's and peft's own modules; true: an error when none applies.",
    )


def _torch() -> Any:
    import torch

    return torch


def _fused_fp32_cpu(x: Any, weight: Any) -> bool:
    """Whether `x` and `weight` take torch's fused CPU kernel, which gives LlamaRMSNorm's value
    and scale to the bit in fp32 (one pass instead of five; it has no CPU backward, so only
    where autograd is not recording)."""
    torch = _torch()
    return (
        x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def _rms_norm_value(x: Any, weight: Any, eps: float) -> tuple[Any, Any]:
    """LlamaRMSNorm's forward, op for op (and the per-token scale)."""
    torch = _torch()
    if _fused_fp32_cpu(x, weight):
        out, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        return out, rstd.view(*x.shape[:-1], 1)
    xf = x.to(torch.float32)
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _rms_norm_input_grad_fp32(grad: Any, x: Any, weight: Any, rstd: Any) -> Any:
    """RMSNorm's input gradient in fp32, in four passes instead of seven:
    rstd * (g*w - x * rstd² * mean(g*w*x))."""
    torch = _torch()
    with torch.autocast(x.device.type, enabled=False):
        grad_normed = grad * weight
        dot = torch.linalg.vecdot(grad_normed, x).unsqueeze(-1)
        scale = dot.mul_(rstd.pow(3)).div_(-x.shape[-1])
        return grad_normed.mul_(rstd).addcmul_(x, scale)


def _rms_norm_function() -> Any:
    import torch

    class RMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
            out, rstd = _rms_norm_value(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return out

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            x, weight, rstd = ctx.saved_tensors
            if not ctx.needs_input_grad[1] and x.dtype == weight.dtype == torch.float32:
                return _rms_norm_input_grad_fp32(grad, x, weight, rstd), None, None
            normed = x.to(torch.float32) * rstd
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = (grad * normed.to(x.dtype)).reshape(-1, weight.shape[-1]).sum(0)
                grad_weight = grad_weight.to(weight.dtype)
            grad_normed = (grad * weight).to(x.dtype).to(torch.float32)
            dot = (grad_normed * normed).mean(-1, keepdim=True)
            grad_x = rstd * (grad_normed - normed * dot)
            return grad_x.to(x.dtype), grad_weight, None

    return RMSNorm


def _silu_mul_function() -> Any:
    import torch

    F = torch.nn.functional

    class SiluMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            ctx.save_for_backward(gate, up)
            silu = F.silu(gate)
            in_place = up.dtype == gate.dtype and up.shape == gate.shape
            return silu.mul_(up) if in_place else silu * up

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            # The ops autograd would run, with SiLU's output recomputed instead of kept.
            gate, up = ctx.saved_tensors
            grad_gate = grad_up = None
            # where every dtype agrees, in place in a fresh tensor: the same values, half the
            # [tokens × intermediate] allocations
            same = grad.dtype == gate.dtype == up.dtype and grad.shape == gate.shape == up.shape
            if ctx.needs_input_grad[0]:
                product = grad * up
                if same:
                    grad_gate = torch.ops.aten.silu_backward.grad_input(
                        product, gate, grad_input=product
                    )
                else:
                    grad_gate = torch.ops.aten.silu_backward(product, gate).to(gate.dtype)
            if ctx.needs_input_grad[1]:
                silu = F.silu(gate)
                grad_up = silu.mul_(grad) if same else (grad * silu).to(up.dtype)
            return grad_gate, grad_up

    return SiluMul


def rotate_half(x: Any) -> Any:
    half = x.shape[-1] // 2
    return _torch().cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope_function() -> Any:
    import torch

    class Rope(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, q: Any, k: Any, cos: Any, sin: Any) -> Any:
            ctx.save_for_backward(cos, sin)
            return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

        @staticmethod
        def backward(ctx: Any, grad_q: Any, grad_k: Any) -> Any:
            # rotate_half's adjoint is -rotate_half.
            cos, sin = ctx.saved_tensors
            grads: list[Any] = []
            for index, grad in enumerate((grad_q, grad_k)):
                if grad is None or not ctx.needs_input_grad[index]:
                    grads.append(None)
                    continue
                grads.append(grad * cos - rotate_half(grad * sin))
            return grads[0], grads[1], None, None

    return Rope


_FUNCTIONS: dict[str, Any] = {}


def function(name: str) -> Any:
    """The autograd Function for `rms_norm`, `silu_mul` or `rope` (built on first use, so that
    importing the plugin does not import torch)."""
    if name not in _FUNCTIONS:
        build = {"rms_norm": _rms_norm_function, "silu_mul": _silu_mul_function}
        _FUNCTIONS[name] = build.get(name, _rope_function)()
    return _FUNCTIONS[name]


def rms_norm(x: Any, weight: Any, eps: float) -> Any:
    out = function("rms_norm").apply(x, weight, eps)
    recompute.remember(out, lambda: _rms_norm_value(x, weight, eps)[0], (x, weight))
    return out


def silu_mul(gate: Any, up: Any) -> Any:
    out = function("silu_mul").apply(gate, up)
    F = _torch().nn.functional
    recompute.remember(out, lambda: F.silu(gate) * up, (gate, up))
    return out


def _norm_eps(module: Any) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _norm_forward(self: Any, hidden_states: Any) -> Any:
    return rms_norm(hidden_states, self.weight, self._lean_eps)


def _mlp_forward(self: Any, x: Any) -> Any:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_norm(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and _norm_eps(module) is not None
        and weight is not None
        and weight.ndim == 1
        and getattr(module, "bias", None) is None
    )


def _is_swiglu_mlp(module: Any) -> bool:
    torch = _torch()
    act = getattr(module, "act_fn", None)
    return (
        all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
        and isinstance(act, torch.nn.Module)
        and type(act).__name__ in ("SiLU", "SiLUActivation")
    )


def _same(reference: Any, candidate: Any) -> bool:
    torch = _torch()
    return reference.shape == candidate.shape and torch.equal(reference, candidate)


def _plain_parameter(module: Any) -> Any:
    """The module's first floating-point parameter, when every parameter is an ordinary
    materialised tensor (not meta, not a ZeRO-3 partition or a DTensor shard)."""
    torch = _torch()
    first = None
    for parameter in module.parameters():
        if parameter.device.type == "meta" or hasattr(parameter, "ds_id"):
            return None
        if type(parameter.data) is not torch.Tensor:
            return None
        if first is None and parameter.is_floating_point():
            first = parameter
    return first


def _has_dropout(module: Any) -> bool:
    """Dropout inside the module (a Dropout layer, or a dropout rate it applies itself): its
    training forward differs from the eval forward the check runs."""
    torch = _torch()
    for inner in module.modules():
        if isinstance(inner, torch.nn.modules.dropout._DropoutNd) and inner.p > 0:
            return True
        for name, value in vars(inner).items():
            if "dropout" in name and isinstance(value, float) and value > 0:
                return True
    return False


def _computes_like(module: Any, forward: Callable[..., Any], width: int) -> bool:
    """Whether `forward` gives `module`'s own output, bit for bit, on random inputs at three
    scales (1e-3, where an epsilon shows; 1; 100, where a clamp shows)."""
    torch = _torch()
    parameter = _plain_parameter(module)
    if parameter is None or _has_dropout(module):
        return False
    generator = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(3, 2, width, generator=generator)
    sample = sample * torch.tensor([1e-3, 1.0, 100.0])[:, None, None]
    sample = sample.to(device=parameter.device, dtype=parameter.dtype)
    with torch.no_grad():
        try:
            return _same(module(sample), forward(module, sample))
        except (RuntimeError, TypeError, ValueError, NotImplementedError):
            return False


_LEAN_CLASSES: dict[tuple[type, Callable[..., Any]], type] = {}


def _lean_class(kind: type, forward: Callable[..., Any]) -> type:
    """A subclass of `kind` with `forward`, under the same name (one per class).

    The class is swapped rather than the instance's `forward` set: transformers re-selects the
    forward of its hub-kernel layers (RMSNorm among them) on `model.train()`, dropping any
    per-instance forward, and keeps the class's."""
    if (kind, forward) not in _LEAN_CLASSES:
        lean = type(kind.__name__, (kind,), {"forward": forward, "__module__": kind.__module__})
        lean.__qualname__ = kind.__qualname__
        _LEAN_CLASSES[kind, forward] = lean
    return _LEAN_CLASSES[kind, forward]


def _replace_forwards(
    model: Any,
    matches: Callable[[Any], bool],
    forward: Callable[..., Any],
    width: Callable[[Any], int],
) -> int:
    """Give every module that `matches` the `forward`, where it computes the same output with
    it as with its own forward (each module checked: layers of one class may differ)."""
    lean_classes = {lean for (_, f), lean in _LEAN_CLASSES.items() if f is forward}
    replaced = 0
    for module in model.modules():
        kind = type(module)
        if kind in lean_classes:
            replaced += 1
        elif matches(module) and _computes_like(module, forward, width(module)):
            module.__class__ = _lean_class(kind, forward)
            replaced += 1
    return replaced


def patch_norms(model: Any) -> int:
    for module in model.modules():
        if _is_norm(module):
            module._lean_eps = _norm_eps(module)
    return _replace_forwards(model, _is_norm, _norm_forward, lambda m: m.weight.shape[0])


def patch_mlps(model: Any) -> int:
    return _replace_forwards(model, _is_swiglu_mlp, _mlp_forward, lambda m: m.gate_proj.in_features)


def _signature(original: Any) -> inspect.Signature:
    # transformers turns the function into a module (its hub-kernel hook) when `kernels` is
    # installed: the function is then its forward.
    torch = _torch()
    return inspect.signature(
        original.forward if isinstance(original, torch.nn.Module) else original
    )


class _Gate:
    """How many lean-rope attention modules are inside their forward on this thread: the
    replaced `apply_rotary_pos_emb` is lean only there, so other models in the process (and this
    one with lean_activations off) keep the original."""

    local = threading.local()

    @classmethod
    def depth(cls) -> int:
        return getattr(cls.local, "depth", 0)

    @classmethod
    def enter(cls, *_: Any) -> None:
        cls.local.depth = cls.depth() + 1

    @classmethod
    def leave(cls, *_: Any) -> None:
        # always called, also when an earlier pre-hook raised before `enter`
        cls.local.depth = max(0, cls.depth() - 1)


def _lean_rope(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = _signature(original)

    def apply_rotary_pos_emb(q: Any, k: Any, cos: Any, sin: Any, *args: Any, **kwargs: Any) -> Any:
        torch = _torch()
        if _Gate.depth() <= 0 or not torch.is_grad_enabled():
            return original(q, k, cos, sin, *args, **kwargs)
        bound = signature.bind(q, k, cos, sin, *args, **kwargs)
        extra = {n: v for n, v in bound.arguments.items() if n not in ("q", "k", "cos", "sin")}
        unsqueeze_dim = extra.pop("unsqueeze_dim", 1)
        plain = (
            any(v is not None for v in extra.values())
            or cos.requires_grad
            or sin.requires_grad
            or cos.shape[-1] != q.shape[-1]
            or k.shape[-1] != q.shape[-1]
        )
        if plain:
            return original(q, k, cos, sin, *args, **kwargs)
        cos = cos.unsqueeze(unsqueeze_dim)
        sin = sin.unsqueeze(unsqueeze_dim)
        return function("rope").apply(q, k, cos, sin)

    apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
    apply_rotary_pos_emb._sft_lean = True  # type: ignore[attr-defined]
    return apply_rotary_pos_emb


def _rotary_cos_sin(model: Any) -> tuple[Any, Any] | None:
    torch = _torch()
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            parameter = _plain_parameter(model)
            if parameter is None:
                return None
            x = torch.zeros(1, 3, 1, device=parameter.device, dtype=parameter.dtype)
            try:
                with torch.no_grad():
                    out = module(x, torch.arange(3, device=parameter.device)[None])
            except (RuntimeError, TypeError, ValueError):
                return None
            if isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape:
                return out
            return None
    return None


def _lean_rope_for(file: Any, cos: Any, sin: Any, heads: int, head_dim: int) -> bool:
    """Install the gated lean `apply_rotary_pos_emb` in a model file, where it gives the same q
    and k as the file's own on the model's cos/sin (already installed: True). Rotary
    embeddings over part of the head, or cos/sin of another width than the head (GPT-OSS's
    halves), keep the file's own."""
    torch = _torch()
    if cos.shape[-1] != head_dim:
        return False
    original = getattr(file, "apply_rotary_pos_emb", None)
    if original is None or not callable(original):
        return False
    if getattr(original, "_sft_lean", False):
        return True
    if list(_signature(original).parameters)[:4] != ["q", "k", "cos", "sin"]:
        return False
    lean = _lean_rope(original)
    generator = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, 3, head_dim, generator=generator)
    k = torch.randn(1, 1, 3, head_dim, generator=generator)
    q = q.to(device=cos.device, dtype=cos.dtype).requires_grad_()
    k = k.to(device=cos.device, dtype=cos.dtype).requires_grad_()
    try:
        with torch.enable_grad():
            reference = original(q, k, cos, sin)
            _Gate.enter()
            try:
                candidate = lean(q, k, cos, sin)
            finally:
                _Gate.leave()
    except (RuntimeError, TypeError, ValueError):
        return False
    if not all(_same(r.detach(), c.detach()) for r, c in zip(reference, candidate, strict=True)):
        return False
    file.apply_rotary_pos_emb = lean
    return True


def patch_rope(model: Any) -> int:
    """Lean rotary embeddings in the attention modules whose model file's
    `apply_rotary_pos_emb` has the standard form (checked on the model's own cos/sin).

    The attention forward looks the function up in its file, so the replacement is installed
    there, and it is lean only inside the forward of the attention modules patched here (a
    forward pre/post hook pair on each): other models keep the original."""
    cos_sin = _rotary_cos_sin(model)
    if cos_sin is None:
        return 0
    cos, sin = cos_sin
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    head_dim = getattr(config, "head_dim", None) or (hidden // heads if heads and hidden else None)
    if not heads or not head_dim:
        return 0
    verdicts: dict[Any, bool] = {}
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        file = sys.modules.get(type(module).__module__)
        if not name.endswith("Attention") or file is None:
            continue
        if file not in verdicts:
            verdicts[file] = _lean_rope_for(file, cos, sin, heads, head_dim)
        if verdicts[file] and not getattr(module, "_sft_lean_rope", False):
            module.register_forward_pre_hook(_Gate.enter)
            module.register_forward_hook(_Gate.leave, always_call=True)
            module._sft_lean_rope = True
            patched += 1
    return patched


def kernel_conflicts(config: Config) -> dict[str, list[str]]:
    """For each lean op, the keys of this config that turn on a kernel plugin (liger's, a third
    party's) replacing the same part of the model (its `Kernel.replaces`; a kernel that does not
    say replaces every part): which patch came last would decide silently."""
    from sft.errors import PluginError

    kernels = config.plugin_set.kernels()
    found: dict[str, list[str]] = {}
    for name, kernel in kernels.items():
        if kernel.enabled_by is None:
            continue
        try:
            keys = list(kernel.enabled_by(config))
            parts = None if kernel.replaces is None or not keys else set(kernel.replaces(config))
        except Exception as exc:  # the kernel plugin's bug, named as such
            owner = kernels.owner(name)
            raise PluginError(
                f"plugin {owner!r}: kernel {name!r} raised {type(exc).__name__}: {exc}",
                plugin=owner,
            ) from exc
        for op in OPS if keys else ():
            if parts is None or op in parts:
                found.setdefault(op, []).extend(keys)
    return found


def _wanted(config: Config) -> list[str]:
    from sft.train.options import compile_enabled

    setting = config.section(LeanKeys).lean_activations
    if setting is False or (setting is None and compile_enabled(config)):
        return []
    taken = kernel_conflicts(config)
    return [op for op in OPS if op not in taken]


def patch_model(model: Any, ops: Sequence[str]) -> dict[str, int]:
    """Apply the lean ops named in `ops` to `model`; how many modules (files for rope) each
    replaced."""
    patchers = {"rms_norm": patch_norms, "swiglu": patch_mlps, "rope": patch_rope}
    return {op: patchers[op](model) for op in ops}


def _recipes_safe(config: Config) -> bool:
    """Whether LoRA may store its inputs as recipes. Not under gradient checkpointing (the
    layers are recomputed anyway, and a recipe would keep the norm's input alive), nor under
    DeepSpeed or FSDP (a recipe reads the norm's weight in backward, where ZeRO-3 or FSDP may
    hold only its shard)."""
    from sft.distributed import selected_backends

    if config.gradient_checkpointing:
        return False
    return not selected_backends(config, config.plugin_set)


def _patch_lora_on_first_forward(model: Any, recipes: bool) -> None:
    """peft attaches the adapter after `sft_patch_model`: its layers are patched when the model
    first runs (the hook goes once it has found them)."""

    def patch(module: Any, _: Any) -> None:
        found = lora.patch_lora_layers(module, recipes)
        if found:
            module._sft_lean_activations["lora"] = found
            handle.remove()

    handle = model.register_forward_pre_hook(patch)


@hookimpl
def sft_config_keys() -> Sequence[ConfigKeys]:
    return [ConfigKeys(LeanKeys)]


@hookimpl
def sft_validate_config(config: Config) -> Sequence[Problem]:
    from sft.train.options import compile_enabled

    if not config.section(LeanKeys).lean_activations:
        return []
    problems = []
    if compile_enabled(config):
        problems.append(
            Problem(
                "lean_activations",
                "conflicts with torch_compile: the compiled graph already recomputes "
                "elementwise ops in backward (its min-cut partitioner) and the lean ops' "
                "per-module hooks would break that graph",
                hint="remove lean_activations (it is off by default under torch_compile)",
            )
        )
    taken = kernel_conflicts(config)
    if taken:
        keys = list(dict.fromkeys(key for found in taken.values() for key in found))
        problems.append(
            Problem(
                "lean_activations",
                f"conflicts with {', '.join(keys)}: that kernel replaces the same "
                f"{', '.join(taken)}",
                hint="remove lean_activations (by default it leaves those parts to the kernel)",
            )
        )
    return problems


@hookimpl
def sft_patch_model(model: Any, config: Config) -> None:
    ops = _wanted(config)
    if not ops or not isinstance(model, _torch().nn.Module):
        return
    counts = patch_model(model, ops)
    model._sft_lean_activations = counts
    if config.adapter in ("lora", "qlora"):
        _patch_lora_on_first_forward(model, _recipes_safe(config))
    if config.section(LeanKeys).lean_activations and not any(counts.values()):
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        raise ModelError(
            f"lean_activations = true applies to none of this {model_type!r} model's modules: "
            "no RMSNorm, SwiGLU MLP or rotary embedding of the standard form\n"
            "  fix: remove lean_activations (or set it to false)"
        )
