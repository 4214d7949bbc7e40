"""Axolotl config keys sft does not support, and what each one does in Axolotl.

Setting one of these to a value that would change a run is a config problem that names the key,
says what it does in Axolotl and, where sft has one, the alternative. A key left blank, null,
false or empty changes nothing and is accepted, so Axolotl's example configs (which list many
keys blank) load unchanged. A few keys change nothing even when set, and are a warning instead:
one that only picks a faster kernel (`speed_only`), one that Axolotl only reads through another
key left blank (`only_with`), and a model-family hint Axolotl works out by itself from
base_model's name (`detected_by_name`). `docs/axolotl.md` is generated from these tables
(`python -m sft.config.axolotl_doc --write`).

Meanings follow Axolotl's config schema (`src/axolotl/utils/schemas/`, its integrations'
`args.py`) and its example configs; "older" keys are ones its current schema no longer has.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class Unsupported:
    """An Axolotl key sft refuses: what it does in Axolotl, and sft's alternative if any."""

    what: str  # a short phrase: what the key does in Axolotl
    instead: str | None = None  # a concrete alternative in sft ("use `x`", "use sft run ...")
    # Axolotl's own default when it is not blank/false: setting the key to it changes nothing.
    default: Any = None
    # Only picks a faster kernel for the same computation: the trained model is the same
    # without it, so a live value is a warning.
    speed_only: bool = False
    # Axolotl reads the key only through these keys: while all of them are blank it changes
    # nothing (a warning); with one of them set it is refused like that key.
    only_with: tuple[str, ...] = ()
    # Axolotl turns this model-family hint on by itself when base_model's last path part
    # contains this name (besides from the model's config): `true` then changes nothing.
    detected_by_name: str | None = None
    # Changes nothing in Axolotl either (why, as a clause): a live value is a warning.
    no_effect: str | None = None
    # A dataset key Axolotl reads only for dataset types starting with one of these: on a
    # dataset of another type it changes nothing (a warning).
    only_for_types: tuple[str, ...] = ()


U = Unsupported

# -- model & tokenizer -----------------------------------------------------------------------
_MODEL: dict[str, Unsupported] = {
    "base_model_config": U("loads the model config from another repo or path than base_model"),
    "base_model_ignore_patterns": U("file patterns skipped when downloading base_model"),
    "model_config_type": U(
        "internal: set by Axolotl from the model config's model_type",
        no_effect="Axolotl overwrites it with the model config's model_type, whatever it says",
    ),
    "overrides_of_model_config": U(
        "overrides values of the model's config at load (the long name of model_config)",
        "use `model_config`",
    ),
    "model_kwargs": U("extra keyword arguments for the model's from_pretrained"),
    "overrides_of_model_kwargs": U("extra keyword arguments for the model's from_pretrained"),
    "type_of_model": U("the internal name of model_type", "use `model_type`"),
    "mean_resizing_embeddings": U("initialises new token embeddings from the mean of the others"),
    "shrink_embeddings": U("shrinks the embeddings to the tokenizer's vocabulary size"),
    "embeddings_skip_upcast": U("keeps the embeddings out of the float32 upcast under PEFT"),
    "random_init_weights": U("an older key (not in Axolotl's current schema): random init"),
    "is_falcon_derived_model": U(
        "internal: tells Axolotl the model is Falcon-based", detected_by_name="falcon"
    ),
    "is_llama_derived_model": U(
        "internal: tells Axolotl the model is Llama-based", detected_by_name="llama"
    ),
    "is_mistral_derived_model": U(
        "internal: tells Axolotl the model is Mistral-based", detected_by_name="mistral"
    ),
    "is_qwen_derived_model": U("internal: tells Axolotl the model is Qwen-based"),
    "added_tokens_overrides": U("renames reserved added tokens by token id"),
    "fix_untrained_tokens": U("sets the embeddings of untrained token ids to the others' mean"),
    "experimental_skip_move_to_device": U(
        "skips moving the model to the GPU before sharding it", default=True
    ),
}

# -- quantization & adapters -----------------------------------------------------------------
_QUANT: dict[str, Unsupported] = {
    "gptq": U("trains an adapter on a GPTQ-quantized model", "use `load_in_4bit` (QLoRA)"),
    "gptq_groupsize": U("an older GPTQ key (not in Axolotl's current schema): group size"),
    "gptq_model_v1": U("an older GPTQ key (not in Axolotl's current schema)"),
    "gptq_disable_exllama": U("turns off the ExLlama kernels of a GPTQ model"),
    "nvfp4_merge_aware": U("trains the adapter so it merges losslessly into an NVFP4 model"),
    "use_onebitllms": U("1.58-bit training of BitNet models with onebitllms"),
    "ternary": U("ternary (1.58-bit) quantization-aware training (Axolotl's ternary plugin)"),
    "llmcompressor": U("fine-tunes a sparsified model keeping its sparsity (LLM Compressor)"),
    "lora_fan_in_fan_out": U(
        "tells PEFT the adapted layers store weights transposed",
        no_effect="peft sets it from each adapted layer's type whatever the key says (true for "
        "GPT-2's Conv1D layers, false for nn.Linear)",
    ),
    "lora_on_cpu": U("loads the LoRA/PEFT model on the CPU (for models that fill the GPU)"),
    "peft_layers_to_transform": U("adds LoRA only to these layer indices"),
    "peft_layers_pattern": U("the layer-name pattern used with peft_layers_to_transform"),
    "peft": U("extra PEFT options such as LoftQ initialisation"),
    "peft_init_lora_weights": U("how the LoRA weights are initialised (PiSSA, OLoRA, ...)"),
    "peft_layer_replication": U("replicates layer ranges to grow the model before adding LoRA"),
    "lora_layer_replication": U("an older name of peft_layer_replication"),
    "qalora_group_size": U("QA-LoRA group size (adapter: qalora)", "use `adapter: qlora`"),
    "peft_model_dir": U("IA³ adapter (adapter: ia3): an adapter to continue from"),
    "peft_target_modules": U("IA³ adapter (adapter: ia3): the modules to scale"),
    "peft_feedforward_modules": U("IA³ adapter (adapter: ia3): which of those are feed-forward"),
    "peft_fan_in_fan_out": U("IA³ adapter (adapter: ia3): weights stored transposed"),
    "relora_steps": U("ReLoRA: merges the adapter into the model and restarts every N steps"),
    "relora_warmup_steps": U("ReLoRA: warmup steps after each restart"),
    "relora_anneal_steps": U("ReLoRA: anneal steps before each restart"),
}

# -- datasets & formats ----------------------------------------------------------------------
_DATA: dict[str, Unsupported] = {
    "shuffle_before_merging_datasets": U("shuffles each dataset before mixing them"),
    "dataset_shard_num": U(
        "uses one shard of the whole mixed dataset", "use `shards` on a dataset entry"
    ),
    "dataset_shard_idx": U(
        "which shard of the whole mixed dataset to use", "use `shards_idx` on a dataset entry"
    ),
    "skip_prepare_dataset": U("tokenises on the fly instead of preparing the data first"),
    "dataset_processes": U("processes for preparing data (older name)", "use `dataset_num_proc`"),
    "dataset_keep_in_memory": U("keeps the dataset in memory while preparing it"),
    "push_dataset_to_hub": U("pushes the prepared dataset to the Hub"),
    "hf_use_auth_token": U(
        "uses your Hub token to load private datasets",
        "log in with `hf auth login` or set HF_TOKEN",
        no_effect="the Hub library sft loads with already uses your login's token (or HF_TOKEN)",
    ),
    "is_preprocess": U("internal: set by `axolotl preprocess`", "use `sft preprocess`"),
    "preprocess_iterable": U("internal: preprocesses an iterable dataset"),
    "sample_packing_group_size": U("samples packed at a time", default=100_000),
    "sample_packing_eff_est": U("packing efficiency estimate taken from an earlier run"),
    "sample_packing_seq_len_multiplier": U("an older multipack key (not in current Axolotl)"),
    "max_packed_sequence_len": U(
        "the old packing length, removed from Axolotl", "use `sample_packing`"
    ),
    "multipack_real_batches": U("a multipack batching option"),
    "total_num_tokens": U("internal: the dataset's token count"),
    "pretrain_multipack_buffer_size": U(
        "samples held for packing a streamed pretraining_dataset",
        only_with=("pretraining_dataset",),
    ),
    "pretrain_multipack_attn": U(
        "keeps packed pretraining samples from attending to each other", default=True
    ),
    "dataloader_pin_memory": U("pins dataloader memory"),
    "dataloader_num_workers": U("dataloader worker processes"),
    "dataloader_prefetch_factor": U("batches each dataloader worker loads ahead"),
    "remove_unused_columns": U("lets the trainer drop dataset columns the model does not take"),
}

# -- training & optimizers -------------------------------------------------------------------
_TRAINING: dict[str, Unsupported] = {
    "auto_find_batch_size": U(
        "lowers the batch size until it fits in memory", "set `micro_batch_size`"
    ),
    "torchdistx_path": U("path to torchdistx for the adamw_anyprecision optimizer"),
    "adam_beta3": U("the CAME optimizer's third beta"),
    "adam_epsilon2": U("the CAME optimizer's second epsilon"),
    "embedding_lr": U("a separate learning rate for the embeddings"),
    "embedding_lr_scale": U("scales the learning rate of the embeddings"),
    "lr_groups": U("learning rates for groups of modules"),
    "router_aux_loss_coef": U("weight of the MoE router's load-balancing loss"),
}

# -- schedules -------------------------------------------------------------------------------
_SCHEDULES: dict[str, Unsupported] = {}

# -- precision & memory ----------------------------------------------------------------------
_PRECISION: dict[str, Unsupported] = {
    "fp8": U("FP8 mixed-precision training (torchao)"),
    "fp8_enable_fsdp_float8_all_gather": U("FP8 all-gather of FSDP-sharded weights"),
    "max_memory": U("memory limit per device for placing the model at load"),
    "gpu_memory_limit": U("memory limit for all GPUs when placing the model at load"),
    "low_cpu_mem_usage": U(
        "transformers' low_cpu_mem_usage model loading (always on in transformers 5)",
        default=True,
    ),
    "device_map": U("places the model across devices at load (transformers device_map)"),
    "gc_steps": U("runs Python garbage collection every N steps"),
    "tiled_mlp": U("ALST tiled MLP: computes the MLP in tiles to save memory on long sequences"),
}

# -- attention & kernels ---------------------------------------------------------------------
_KERNELS: dict[str, Unsupported] = {
    "s2_attention": U("shifted-sparse attention (LongLoRA), removed from Axolotl"),
    "attention": U(
        "not a key Axolotl defines (some of its examples set `attention: flash`)",
        "for flash attention use `attn_implementation = 'flash_attention_2'`",
        no_effect="Axolotl drops keys it does not define, so the run there used the default "
        "attention, as it does here",
    ),
    "flash_attn_cross_entropy": U(
        "flash-attn's fused cross-entropy kernel", "use `liger_cross_entropy`", speed_only=True
    ),
    "flash_attn_rms_norm": U(
        "flash-attn's RMSNorm kernel", "use `liger_rms_norm`", speed_only=True
    ),
    "flash_attn_fuse_qkv": U(
        "fuses the q/k/v projections into one matmul (flash-attn patch)", speed_only=True
    ),
    "flash_attn_fuse_mlp": U(
        "fuses part of the MLP into one operation (flash-attn patch)", speed_only=True
    ),
    "flash_optimum": U("BetterTransformer attention from optimum"),
    "flex_attn_compile_kwargs": U(
        "torch.compile options for the flex attention kernel", speed_only=True
    ),
    "gemma4_hybrid_attn_impl": U(
        "Gemma 4: flash attention on sliding-window layers, sdpa on the others",
        "set `attn_implementation`",
        speed_only=True,
    ),
    "fused_attn_kernel": U(
        "Axolotl's fused q/k RMSNorm + RoPE kernel for supported models", speed_only=True
    ),
    "scaling_softmax": U("Scaled Softmax (SSMax) attention"),
    "nsa_block_size": U("sparse attention (attn_implementation: fsa): block size"),
    "nsa_topk": U("sparse attention (attn_implementation: fsa): blocks each query selects"),
    "nsa_kernel_size": U("sparse attention (attn_implementation: fsa): compression kernel"),
    "nsa_kernel_stride": U("sparse attention (attn_implementation: fsa): compression stride"),
    "nsa_init_blocks": U("sparse attention (attn_implementation: fsa): initial blocks kept"),
    "nsa_local_blocks": U("sparse attention (attn_implementation: fsa): local blocks kept"),
    "nsa_window_size": U("sparse attention (attn_implementation: fsa): sliding window"),
    "unsloth_cross_entropy_loss": U(
        "Unsloth's cross-entropy kernel", "use `liger_cross_entropy`", speed_only=True
    ),
    # The fused LoRA kernels (Unsloth's and Axolotl's) patch only adapters without dropout or
    # bias, where they compute exactly what peft's layers do.
    "unsloth_lora_mlp": U("Unsloth's fused LoRA MLP kernel", speed_only=True),
    "unsloth_lora_qkv": U("Unsloth's fused LoRA q/k/v kernel", speed_only=True),
    "unsloth_lora_o": U("Unsloth's fused LoRA output-projection kernel", speed_only=True),
    "unsloth_rms_norm": U("Unsloth's RMSNorm kernel", "use `liger_rms_norm`", speed_only=True),
    "unsloth_rope": U("Unsloth's RoPE kernel", "use `liger_rope`", speed_only=True),
    "lora_qkv_kernel": U(
        "Axolotl's fused Triton LoRA kernel for the q/k/v projections", speed_only=True
    ),
    "lora_o_kernel": U(
        "Axolotl's fused Triton LoRA kernel for the output projection", speed_only=True
    ),
    "lora_mlp_kernel": U("Axolotl's fused Triton LoRA kernel for the MLP", speed_only=True),
    "liger_rms_norm_gated": U(
        "Liger's gated RMSNorm kernel", "use `liger_rms_norm`", speed_only=True
    ),
    "use_kernels": U(
        "swaps in kernels from the Hugging Face kernels hub (e.g. MegaBlocks MoE, RMSNorm)",
        "set `experts_implementation` (e.g. grouped_mm) for MoE models",
        speed_only=True,
    ),
    "use_scattermoe": U(
        "ScatterMoE Triton kernels for MoE experts (kernels plugin)",
        "set `experts_implementation` (e.g. grouped_mm)",
        speed_only=True,
    ),
    "use_sonicmoe": U(
        "SonicMoE kernels for MoE experts (kernels plugin)",
        "set `experts_implementation = 'sonicmoe'`",
        speed_only=True,
    ),
    "use_dsv4_kernels": U("fused Triton training kernels for DeepSeek-V4 (kernels plugin)"),
    "use_glm_dsa_kernels": U("fused kernels for GLM's sparse attention (kernels plugin)"),
    "expert_parallel_num_nvl_bytes": U("DeepEP expert parallelism: NVLink buffer size"),
    "expert_parallel_token_capacity": U(
        "DeepEP expert parallelism: most tokens routed to one expert per forward"
    ),
    "diffusion": U("diffusion language-model training (diffusion plugin)"),
    "ple_cpu_offload": U(
        "keeps the parameters a model declares in `_no_placement_params` (e.g. a large "
        "per-layer embedding table) in host RAM"
    ),
    "dsv4_fp4_grouped_mode": U("grouped FP4 path for NVFP4 MoE experts (kernels plugin)"),
    "moe_kernels": U(
        "grouped-GEMM Triton kernels for MoE layers (moe_kernels plugin)",
        "set `experts_implementation` (e.g. grouped_mm)",
        speed_only=True,
    ),
    "moe_group_size": U("GEMM group size of the moe_kernels plugin", speed_only=True),
    "moe_persistent_kernel": U(
        "persistent-kernel variant of the moe_kernels plugin", speed_only=True
    ),
}

# -- evaluation ------------------------------------------------------------------------------
_EVAL: dict[str, Unsupported] = {
    "eval_table_size": U("logs a table of sample predictions to W&B at evaluation"),
    "eval_max_new_tokens": U(
        "tokens generated for the eval_table_size / do_causal_lm_eval predictions",
        only_with=("eval_table_size", "do_causal_lm_eval"),
    ),
    "eval_table_max_new_tokens": U(
        "older name of eval_max_new_tokens", only_with=("eval_table_size", "do_causal_lm_eval")
    ),
    "do_causal_lm_eval": U("computes generation metrics (sacrebleu, chrf, ...) at evaluation"),
    "eval_causal_lm_metrics": U("the metrics do_causal_lm_eval computes"),
    "do_bench_eval": U("runs a benchmark dataset at evaluation"),
    "bench_dataset": U("the benchmark dataset of do_bench_eval"),
    "bench_split": U("the split of bench_dataset"),
    "benchmark_api": U("sends checkpoints to an external benchmark service (plugin)"),
}

# -- saving & hub ----------------------------------------------------------------------------
_SAVING: dict[str, Unsupported] = {
    "save_safetensors": U("saves weights as safetensors, as sft always does", default=True),
    "save_first_step": U("saves a checkpoint after the first step"),
}

# -- tracking --------------------------------------------------------------------------------
_TRACKING: dict[str, Unsupported] = {
    "comet_experiment_config": U("extra Comet experiment settings"),
    "include_tokens_per_second": U(
        "reports tokens per second at the end of training",
        "read tok/s on sft's log lines, logged every logging_steps",
    ),
    "profiler_steps": U("records a PyTorch memory profile of the first N steps"),
    "debug": U("an older Axolotl debug switch (not in its current schema)"),
    "trackio_project_name": U("Trackio experiment tracking: project"),
    "trackio_run_name": U("Trackio experiment tracking: run name"),
    "trackio_space_id": U("Trackio experiment tracking: Hugging Face Space"),
    "use_swanlab": U("SwanLab experiment tracking (swanlab plugin)"),
    "swanlab_project": U("SwanLab: project"),
    "swanlab_experiment_name": U("SwanLab: experiment name"),
    "swanlab_description": U("SwanLab: experiment description"),
    "swanlab_mode": U("SwanLab: cloud, local, offline or disabled"),
    "swanlab_log_completions": U("SwanLab: logs RL completions", default=True),
}

# -- distributed -----------------------------------------------------------------------------
_DISTRIBUTED: dict[str, Unsupported] = {
    "local_rank": U("set by the launcher, not in configs", "use `sft run --nproc-per-node`"),
    "ddp": U("forces DistributedDataParallel", "use `sft run --nproc-per-node`"),
    "ddp_timeout": U("timeout of the distributed process group"),
    "ddp_bucket_cap_mb": U("DDP gradient bucket size"),
    "ddp_broadcast_buffers": U("DDP broadcasts module buffers each step"),
    "accelerator_config": U("options for Hugging Face Accelerate"),
    "sequence_parallel_degree": U("older name of context_parallel_size"),
    "context_parallel_size": U("splits each sequence across GPUs (context parallelism)"),
    "context_parallel": U("context-parallel settings (size, backend, ring implementation)"),
    "tensor_parallel_size": U("tensor parallelism (DeepSpeed AutoTP)"),
    "use_ray": U("runs training on Ray Train", "use `sft run --nnodes` for many nodes"),
    "ray_num_workers": U("Ray Train workers", default=1),
}

# -- RL & multimodal -------------------------------------------------------------------------
_RL: dict[str, Unsupported] = {
    "rl": U("preference/RL training (DPO, ORPO, KTO, GRPO); sft does supervised fine-tuning"),
    "trl": U("TRL options of preference/RL training"),
    "grpo": U("GRPO (RL) options"),
    "reward_model": U("trains a reward model"),
    "process_reward_model": U("trains a process reward model"),
    "num_labels": U("output labels of a reward model"),
    "orpo_alpha": U("ORPO loss weight (RL)"),
    "simpo_gamma": U("SimPO reward margin (RL)"),
    "cpo_alpha": U("CPO behaviour-cloning weight (RL)"),
    "rpo_alpha": U("RPO NLL weight (RL)"),
    "dpo_beta": U("DPO beta (older name of rl_beta)"),
    "dpo_label_smoothing": U("DPO label smoothing (RL)"),
    "dpo_use_weighting": U("DPO weighting (RL)"),
    "dpo_padding_free": U("padding-free DPO (RL)"),
    "kto_desirable_weight": U("KTO desirable-loss weight (RL)"),
    "kto_undesirable_weight": U("KTO undesirable-loss weight (RL)"),
    "processor_type": U("transformers processor class of a multimodal model"),
    "processor_config": U("an older multimodal processor key (not in current Axolotl)"),
}

del U

# Each topic's refused keys, in the order docs/axolotl.md shows them.
UNSUPPORTED_ROOT_BY_TOPIC: dict[str, dict[str, Unsupported]] = {
    "Model & tokenizer": _MODEL,
    "Quantization & adapters": _QUANT,
    "Datasets & formats": _DATA,
    "Training & optimizers": _TRAINING,
    "Schedules": _SCHEDULES,
    "Precision & memory": _PRECISION,
    "Attention & kernels": _KERNELS,
    "Evaluation": _EVAL,
    "Saving & hub": _SAVING,
    "Tracking": _TRACKING,
    "Distributed": _DISTRIBUTED,
    "RL & multimodal": _RL,
}

# Axolotl integrations (`plugins:` entries) that only pick faster kernels for the same
# computation: set, each is a warning (sft trains the same model without it).
SPEED_ONLY_INTEGRATIONS: dict[str, str] = {
    "axolotl.integrations.kernels.KernelsPlugin": "Hugging Face kernels-hub, ScatterMoE and "
    "SonicMoE kernels for MoE experts (use_kernels, use_scattermoe, use_sonicmoe)",
}

# Keys found in Axolotl's own example configs that are not Axolotl keys: Axolotl drops them
# unread (its schema ignores unknown keys). sft refuses every unknown key; for these the
# message says so, and what the writer most likely meant.
# Keys that Axolotl's own example configs set but its schema does not have: Axolotl drops them
# unread, so they never did anything. Accepted with a warning (the run is the one Axolotl ran);
# the hint says what the key was presumably meant to do.
NOT_AXOLOTL_KEYS: dict[str, str] = {
    "eta_min": "the floor of the cosine schedule is cosine_min_lr_ratio, a fraction of "
    "learning_rate (eta_min / learning_rate)",
    "adam_eps": "AdamW's epsilon is adam_epsilon",
    "context_parapllel_size": "a misspelling of context_parallel_size, which sft does not "
    "support (context parallelism needs several GPUs); remove it",
    "test_value": "remove it",
}

UNSUPPORTED_ROOT_KEYS: dict[str, Unsupported] = {
    name: entry for group in UNSUPPORTED_ROOT_BY_TOPIC.values() for name, entry in group.items()
}

# Keys of a `datasets:` entry.
UNSUPPORTED_DATASET_KEYS: dict[str, Unsupported] = {
    "preprocess_shards": Unsupported("prepares the dataset in N sequential chunks to save memory"),
    "field_human": Unsupported(
        "old sharegpt format: field of the human turns",
        "use `type: chat_template`",
        only_for_types=("sharegpt",),
    ),
    "field_model": Unsupported(
        "old sharegpt format: field of the model turns",
        "use `type: chat_template`",
        only_for_types=("sharegpt",),
    ),
    "input_transform": Unsupported("a transform applied to rows before formatting"),
    "trust_remote_code": Unsupported("runs the Hub dataset's own loading code"),
    "train_on_split": Unsupported("an older dataset key (not in Axolotl's current schema)"),
    "skip": Unsupported("skips the first rows of a streamed pretraining_dataset entry"),
}

# Axolotl keys sft reads under another name or handles its own way: key -> what sft does.
MAPPED_KEYS: dict[str, str] = {
    "flash_attention": "same as `attn_implementation: flash_attention_2`",
    "sdp_attention": "same as `attn_implementation: sdpa`",
    "flex_attention": "same as `attn_implementation: flex_attention`",
    "eager_attention": "same as `attn_implementation: eager`",
    "noisy_embedding_alpha": "read as `neftune_noise_alpha` (Axolotl's older name)",
    "pretraining_dataset": "its entries are the training datasets, streamed (`streaming = true`); "
    "an entry's type defaults to `pretrain` (the `text_column` text, all trained, long texts "
    "split into sequence_len chunks without Axolotl's overlapping windows)",
    "strict": "accepted and ignored: it only lets Axolotl's CLI override config keys, which "
    "sft's `--set` always can",
}

# `strict` only tells Axolotl whether to override keys from the CLI; it never changes a run.
IGNORED_ROOT_KEYS: frozenset[str] = frozenset({"strict"})

# Keys sft reads whose 0 Axolotl takes as "not set" (it tests them for truth): `evals_per_epoch:
# 0` is no evaluations per epoch, as if the key were left out, not a value out of bounds.
ZERO_IS_BLANK: frozenset[str] = frozenset(
    {"eval_steps", "evals_per_epoch", "save_steps", "saves_per_epoch"}
)


def _table(dataset: bool) -> dict[str, Unsupported]:
    return UNSUPPORTED_DATASET_KEYS if dataset else UNSUPPORTED_ROOT_KEYS


def is_inert(value: object, name: str | None = None, dataset: bool = False) -> bool:
    """True when a value leaves an Axolotl key switched off (blank, null, false, empty).

    With the key's `name`, a value equal to Axolotl's own default (`Unsupported.default`, e.g.
    `save_safetensors: true`) is inert too: it is what leaving the key out does in Axolotl.
    """
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    entry = _table(dataset).get(name) if name is not None else None
    return entry is not None and entry.default is not None and value == entry.default


def _named(name: str, entry: Unsupported | None, kind: str = "") -> str:
    what = f" — {entry.what} —" if entry is not None else ""
    return f"Axolotl's {kind}`{name}`{what}"


def unsupported_message(name: str, dataset: bool = False) -> tuple[str, str]:
    """The problem and hint for an Axolotl key sft does not support, set to a live value."""
    entry = _table(dataset).get(name)
    message = _named(name, entry, "dataset key " if dataset else "") + " is not supported by sft"
    if entry is not None and entry.instead:
        return message, f"remove it; instead, {entry.instead}"
    return message, "remove it (or leave it blank)"


def no_effect_message(
    name: str, scope: Mapping[str, Any], dataset: bool = False
) -> tuple[str, str] | None:
    """The warning and hint for an Axolotl key set to a live value that still changes nothing
    (`speed_only`, `only_with` keys all blank, `detected_by_name` from base_model); None when
    the key would change the run (it is then refused: `unsupported_message`).

    `scope` holds the key's neighbours (the top-level config, or its dataset entry).
    """
    entry = _table(dataset).get(name)
    if entry is None:
        return None
    named = _named(name, entry, "dataset key " if dataset else "")
    silence = "remove it to silence this"
    if entry.speed_only:
        message = (
            f"has no effect in sft: {named} only changes speed; sft trains the same model "
            "without it"
        )
        return message, silence + (f" (for the speed, {entry.instead})" if entry.instead else "")
    kind = scope.get("type")
    if entry.only_for_types and not (
        isinstance(kind, str) and kind.startswith(entry.only_for_types)
    ):
        return (
            f"has no effect: {named} Axolotl reads it only for type "
            f"{' / '.join(entry.only_for_types)}, not {kind!r}",
            silence,
        )
    if entry.no_effect:
        return f"has no effect: {named} {entry.no_effect}", silence + (
            f"; {entry.instead}" if entry.instead else ""
        )
    if entry.only_with and all(is_inert(scope.get(key), key, dataset) for key in entry.only_with):
        keys = " or ".join(f"`{key}`" for key in entry.only_with)
        blank = "is" if len(entry.only_with) == 1 else "are"
        return f"has no effect: {named} only matters with {keys}, which {blank} not set", silence
    base_model = scope.get("base_model")
    if (
        entry.detected_by_name
        and scope.get(name) is True
        and isinstance(base_model, str)
        and entry.detected_by_name in base_model.rstrip("/").rsplit("/", 1)[-1].lower()
    ):
        return (
            f"has no effect: {named} Axolotl already sets it for base_model "
            f"{base_model!r} (its name contains {entry.detected_by_name!r})",
            silence,
        )
    return None
