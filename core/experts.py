"""MoE expert weights kept as fused 3-D parameters (transformers 5): quantizing them, and
finding them for peft's `target_parameters`.

bitsandbytes' 4/8-bit loading replaces `nn.Linear` layers only, so the experts of a fused MoE
model (most of its weights) stay in the load dtype. `quantize_moe_experts` quantizes them after
loading with a bitsandbytes parametrization: the weight is stored packed and dequantized when the
experts' forward reads it, and LoRA on it (`lora_target_parameters`) stacks on top.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from sft.errors import ModelError


def expert_modules(model: Any) -> list[tuple[str, Any]]:
    """The modules holding fused expert weights: transformers' experts classes (built with
    `use_experts_implementation`, or named `...Experts`) with a 3-D floating parameter."""
    found = []
    for name, module in model.named_modules():
        is_experts = hasattr(module, "is_concatenated") or type(module).__name__.endswith("Experts")
        if is_experts and any(
            p.ndim >= 3 and p.is_floating_point() for p in module.parameters(recurse=False)
        ):
            found.append((name, module))
    return found


def _int8_parametrization() -> Any:
    """A parametrization that stores a weight as int8 rows with one scale per row (LLM.int8()'s
    vector-wise quantization) and gives back the weight in its original dtype."""
    import bitsandbytes.functional as F
    import torch

    class Int8RowParametrization(torch.nn.Module):
        def __init__(self, row_stats: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
            super().__init__()
            self.register_buffer("row_stats", row_stats)
            self.shape = shape
            self.dtype = dtype

        def forward(self, quantized: torch.Tensor) -> torch.Tensor:
            row_stats: torch.Tensor = self.row_stats  # type: ignore[assignment]  # a buffer
            rows = F.int8_vectorwise_dequant(quantized, row_stats)
            return rows.reshape(self.shape).to(self.dtype)

    return Int8RowParametrization


def quantize_expert_weights(model: Any, *, bits: int, quant_type: str, double_quant: bool) -> int:
    """Quantize every fused expert weight in place (4-bit NF4/FP4 or 8-bit rows); return how many
    were quantized. Raises ModelError when the model has none."""
    import torch
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    from torch.nn.utils import parametrize

    modules = expert_modules(model)
    if not modules:
        raise ModelError(
            "quantize_moe_experts = true, but this model keeps no MoE expert weights as fused "
            "3-D parameters (a dense model, or experts built from nn.Linear layers, which "
            "load_in_4bit/8bit already quantize)\n  fix: remove quantize_moe_experts"
        )
    int8 = _int8_parametrization() if bits == 8 else None
    count = 0
    for _, module in modules:
        for name, parameter in list(module.named_parameters(recurse=False)):
            if parameter.ndim < 3 or not parameter.is_floating_point():
                continue
            if int8 is None:
                replace_parameter_4bit(
                    module,
                    name,
                    compress_statistics=double_quant,
                    quant_type=quant_type,  # type: ignore[arg-type]  # "nf4" or "fp4", from the config
                )
            else:
                import bitsandbytes.functional as F

                weight = parameter.data
                rows = weight.reshape(-1, weight.shape[-1]).to(torch.float16)
                quantized, row_stats, _ = F.int8_vectorwise_quant(rows)
                setattr(module, name, torch.nn.Parameter(quantized, requires_grad=False))
                parametrize.register_parametrization(
                    module, name, int8(row_stats, weight.shape, weight.dtype), unsafe=True
                )
            count += 1
        if int8 is None:
            _keep_torch_state_dict_names(module)
    _fix_peft_stacked_lora_removal()
    return count


def _keep_torch_state_dict_names(module: Any) -> None:
    """Keep a 4-bit weight's state-dict entry as torch's parametrization writes it
    (`parametrizations.<name>.original`, the packed data) instead of bitsandbytes' renaming
    (`<name>`, `<name>.absmax`, ...): torch's distributed state dict (FSDP2 checkpoints and the
    final save) resolves every key by getattr, and those names are not attributes
    (`module.<name>` would even dequantize sharded data with unsharded statistics). Nothing
    else reads them: a quantized model trains an adapter, whose files hold its own weights
    only, and a resumed run quantizes the base weights again the same way."""
    from bitsandbytes.nn.parametrize import _parametrized_state_dict_post_hook

    hooks = module._state_dict_hooks
    for handle, hook in list(hooks.items()):
        if getattr(hook, "func", None) is _parametrized_state_dict_post_hook:
            del hooks[handle]


def full_target_parameters(model: Any, targets: tuple[str, ...]) -> list[str]:
    """`lora_target_parameters` (name suffixes) as the full names peft needs for parameters that
    already carry a parametrization (peft matches those by exact module name only)."""
    wanted = []
    for module_name, module in model.named_modules():
        for name in getattr(module, "parametrizations", {}):
            full = f"{module_name}.{name}"
            if any(full == t or full.endswith(f".{t}") for t in targets):
                wanted.append(full)
    return wanted


def _fix_peft_stacked_lora_removal() -> None:
    """Two peft 0.21 faults with LoRA on a parameter that already carries a parametrization
    (the quantized expert weights), fixed here for peft's `ParamWrapper`:

    - registering its LoRA proxy evaluates the parameter; when an outer wrapper of the same
      module (a second targeted parameter) has already turned torch's parametrization cache on,
      that value, without the proxy, is cached and used: this LoRA gets no gradient. The stale
      entry is dropped once the proxy is in place.
    - after the forward it removes only the `_LoraParameterProxy` kind, leaving the
      low-rank-factors kind (fp32 weights of several experts) stacked for the next forward.
    """
    import contextlib

    from peft.tuners.lora import layer
    from torch.nn.utils import parametrize

    factors = getattr(layer, "_LoraFactorsProxy", None)
    wrapper = getattr(layer, "ParamWrapper", None)
    if factors is None or wrapper is None or getattr(wrapper, "_sft_fixed", False):
        return
    proxies = (layer._LoraParameterProxy, factors)
    remove_original = wrapper._remove_parametrizations
    activate_original = wrapper._activate_lora

    def remove(self: Any) -> None:
        chain = self.get_base_layer().parametrizations[self.parameter_name]
        if len(chain) > 1:
            for index in reversed(range(len(chain))):
                if isinstance(chain[index], proxies):
                    del chain[index]
                    return
        remove_original(self)

    @contextlib.contextmanager
    def activate(self: Any, active_adapters: list[str]) -> Any:
        with activate_original(self, active_adapters):
            cache = getattr(parametrize, "_cache", None)
            if cache is not None:
                cache.pop((id(self.get_base_layer()), self.parameter_name), None)
            yield

    wrapper._remove_parametrizations = remove
    wrapper._activate_lora = activate
    wrapper._sft_fixed = True


# -- Llama 4 experts as one nn.Linear each (`llama4_linearized_experts`) ----------------------


def _linearized_llama4_experts_class() -> type:
    import torch
    from torch import nn
    from transformers.activations import ACT2FN

    class LinearizedLlama4Experts(nn.Module):
        """transformers' `Llama4TextExperts` with each expert's gate, up and down projections
        as their own `nn.Linear` (`gate_projs.N`, `up_projs.N`, `down_projs.N`): the layout of
        checkpoints saved for per-expert LoRA and bitsandbytes quantization. The same
        computation as the fused module, expert by expert."""

        def __init__(self, config: Any) -> None:
            super().__init__()
            self.num_experts = config.num_local_experts
            self.hidden_size = config.hidden_size
            self.expert_dim = config.intermediate_size

            def linears(width_in: int, width_out: int) -> nn.ModuleList:
                return nn.ModuleList(
                    nn.Linear(width_in, width_out, bias=False) for _ in range(self.num_experts)
                )

            self.gate_projs = linears(self.hidden_size, self.expert_dim)
            self.up_projs = linears(self.hidden_size, self.expert_dim)
            self.down_projs = linears(self.expert_dim, self.hidden_size)
            self.act_fn = ACT2FN[config.hidden_act]

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            # (experts × tokens, hidden), sorted by expert, as Llama4TextMoe hands it over
            per_expert = hidden_states.view(self.num_experts, -1, self.hidden_size)
            outputs = [
                self.down_projs[e](self.up_projs[e](x) * self.act_fn(self.gate_projs[e](x)))
                for e, x in enumerate(per_expert)
            ]
            return torch.stack(outputs).view(-1, self.hidden_size)

    return LinearizedLlama4Experts


@contextlib.contextmanager
def linearized_llama4_experts(active: bool = True) -> Iterator[None]:
    """While active, Llama 4 MoE blocks are built with `LinearizedLlama4Experts` as their
    experts (`llama4_linearized_experts`; inactive, nothing changes). The MoE block's
    constructor is wrapped, not the experts class replaced in its module: transformers' weight
    init tells the fused class apart by `isinstance`."""
    if not active:
        yield
        return
    from transformers.models.llama4 import modeling_llama4

    moe = modeling_llama4.Llama4TextMoe
    stock_init = moe.__init__
    linearized = _linearized_llama4_experts_class()

    def init(block: Any, config: Any) -> None:
        stock_init(block, config)
        block.experts = linearized(config)

    moe.__init__ = init  # type: ignore[method-assign]
    try:
        yield
    finally:
        moe.__init__ = stock_init  # type: ignore[method-assign]


def stores_linearized_llama4_experts(unexpected_keys: list[str]) -> bool:
    """Whether a checkpoint loaded with transformers' fused Llama 4 experts held them in the
    linearized layout instead (its per-expert weights went unused)."""
    return any(".experts.gate_projs." in key for key in unexpected_keys)


def check_linearized_llama4_load(model: Any, missing_keys: list[str], base_model: str) -> None:
    """After loading with `llama4_linearized_experts`: the model must be a Llama 4 model, and
    the checkpoint must hold the experts in the linearized layout (a fused checkpoint leaves
    the per-expert weights uninitialised, which would train from noise)."""
    linearized = [
        name
        for name, module in model.named_modules()
        if type(module).__name__ == "LinearizedLlama4Experts"
    ]
    if not linearized:
        raise ModelError(
            f"llama4_linearized_experts = true, but {base_model!r} is not a Llama 4 model (no "
            "Llama 4 MoE experts were built)\n  fix: remove llama4_linearized_experts"
        )
    uninitialised = [key for key in missing_keys if ".experts." in key]
    if uninitialised:
        raise ModelError(
            f"llama4_linearized_experts = true, but {base_model!r} has no linearized expert "
            f"weights (missing {uninitialised[0]} and {len(uninitialised) - 1} more): its "
            "experts are stored fused (experts.gate_up_proj, experts.down_proj)\n"
            "  fix: remove llama4_linearized_experts to train this checkpoint as it is, or use "
            "a checkpoint saved with linearized experts (experts.gate_projs.N, up_projs.N, "
            "down_projs.N)"
        )
