"""Acceptance: Axolotl-style configs (written here from Axolotl's documented keys, in the shapes its
users write) through `sft validate --portable`, with the verdict a user should get for each."""

from __future__ import annotations

import textwrap

import pytest

LORA_LLAMA3 = """
base_model: NousResearch/Meta-Llama-3-8B-Instruct
model_type: LlamaForCausalLM
tokenizer_type: AutoTokenizer
load_in_8bit: false
load_in_4bit: false
strict: false

chat_template: llama3
datasets:
  - path: fozziethebeat/alpaca_messages_2k_test
    type: chat_template
    field_messages: messages
    message_property_mappings:
      role: role
      content: content
    roles:
      user: [user]
      assistant: [assistant]
dataset_prepared_path:
val_set_size: 0.05
output_dir: ./outputs/lora-out

sequence_len: 4096
sample_packing: true
eval_sample_packing: false
pad_to_sequence_len: true

adapter: lora
lora_model_dir:
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
lora_fan_in_fan_out:
lora_qkv_kernel: true
lora_o_kernel: true
lora_mlp_kernel: true

wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:

gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002

train_on_inputs: false
group_by_length:
bf16: auto
fp16:
tf32: false

gradient_checkpointing: true
early_stopping_patience:
resume_from_checkpoint:
local_rank:
logging_steps: 1
xformers_attention:
flash_attention: true

warmup_steps: 10
evals_per_epoch: 4
eval_table_size:
eval_max_new_tokens: 128
saves_per_epoch: 1
debug:
deepspeed:
weight_decay: 0.0
fsdp:
fsdp_config:
special_tokens:
  pad_token: <|end_of_text|>
"""

QLORA_MISTRAL = """
base_model: mistralai/Mistral-7B-v0.1
model_type: MistralForCausalLM
tokenizer_type: LlamaTokenizer
load_in_4bit: true
adapter: qlora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_modules:
  - gate_proj
  - down_proj
  - up_proj
  - q_proj
  - v_proj
  - k_proj
  - o_proj
datasets:
  - path: mhenrichsen/alpaca_2k_test
    type: alpaca
val_set_size: 0.1
output_dir: ./outputs/qlora-out
sequence_len: 8192
sample_packing: true
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 1
optimizer: paged_adamw_32bit
lr_scheduler: cosine
learning_rate: 0.0002
loraplus_lr_ratio: 16
bf16: auto
gradient_checkpointing: true
flash_attention: true
loss_watchdog_threshold: 5.0
loss_watchdog_patience: 3
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
save_strategy: steps
"""

FULL_FT_CCE = """
base_model: Qwen/Qwen2.5-0.5B
plugins:
  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin
  - axolotl.integrations.liger.LigerPlugin
liger_rope: true
liger_rms_norm: true
liger_glu_activation: true
liger_fused_linear_cross_entropy: false
chat_template: chatml
eot_tokens:
  - "<|im_end|>"
datasets:
  - path: mlabonne/FineTome-100k
    type: chat_template
    split: train[:20%]
    field_messages: conversations
    message_field_role: from
    message_field_content: value
output_dir: ./outputs/out
sequence_len: 2048
sample_packing: true
gradient_accumulation_steps: 8
micro_batch_size: 1
num_epochs: 1
optimizer: adamw_torch_fused
lr_scheduler: warmup_stable_decay
lr_scheduler_kwargs:
  num_decay_steps: 100
learning_rate: 2e-5
neftune_noise_alpha: 5
bf16: true
tf32: true
gradient_checkpointing: offload
attn_implementation: sdpa
logging_steps: 1
save_steps: 0
evals_per_epoch: 0
save_safetensors: true
deepspeed: zero3
"""

FSDP2_LORA = """
base_model: meta-llama/Llama-3.2-1B
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
output_dir: ./outputs/fsdp
adapter: lora
lora_r: 16
lora_alpha: 32
lora_target_modules: '.*\\.layers\\.\\d+\\.self_attn\\.(q|k|v|o)_proj'
sequence_len: 2048
micro_batch_size: 1
gradient_accumulation_steps: 4
num_epochs: 1
learning_rate: 0.0002
bf16: auto
fsdp_version: 2
fsdp_config:
  offload_params: false
  cpu_ram_efficient_loading: true
  auto_wrap_policy: TRANSFORMER_BASED_WRAP
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
  state_dict_type: FULL_STATE_DICT
  reshard_after_forward: true
  sync_module_states: true
  use_orig_params: false
wandb_project: llama-fsdp
wandb_mode: offline
"""

MOE = """
base_model: Qwen/Qwen3-30B-A3B
load_in_4bit: true
adapter: qlora
quantize_moe_experts: true
lora_target_parameters:
  - mlp.experts.gate_up_proj
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
"""

MOE_EXPERT_PARALLEL = MOE + "expert_parallel_size: 2\n"

MOE_EXPERT_PARALLEL_BF16 = """
base_model: Qwen/Qwen3-30B-A3B
plugins:
  - axolotl.integrations.expert_parallel.ExpertParallelPlugin
expert_parallel_size: 2
adapter: lora
lora_target_modules: [q_proj, v_proj]
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
"""

HSDP = """
base_model: meta-llama/Llama-3.1-8B
dp_shard_size: 8
dp_replicate_size: 2
fsdp_version: 2
fsdp_config:
  state_dict_type: SHARDED_STATE_DICT
  transformer_layer_cls_to_wrap: LlamaDecoderLayer
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
"""

DPO = """
base_model: meta-llama/Llama-3.2-1B-Instruct
rl: dpo
datasets:
  - path: Intel/orca_dpo_pairs
    type: chatml.intel
"""

MULTIMODAL = """
base_model: google/gemma-3-4b-it
processor_type: AutoProcessor
model_type: Gemma3ForConditionalGeneration
datasets:
  - path: HuggingFaceH4/llava-instruct-mix-vsft
    type: chat_template
"""

MISTRAL_COMMON = """
base_model: mistralai/Magistral-Small-2506
tokenizer_use_mistral_common: true
datasets:
  - path: Nanobit/text-think-2k-test
    type: chat_template
"""

MISTRAL_COMMON_ALPACA = """
base_model: mistralai/Magistral-Small-2506
tokenizer_use_mistral_common: true
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
"""

UNKNOWN_INTEGRATION = """
base_model: meta-llama/Llama-3.2-1B
plugins:
  - axolotl.integrations.kd.KDPlugin
datasets:
  - path: tatsu-lab/alpaca
    type: alpaca
"""

CURRICULUM = """
base_model: microsoft/Phi-3-mini-4k-instruct
trust_remote_code: true
datasets:
  - path: garage-bAInd/Open-Platypus
    type: alpaca:phi
  - path: openaccess-ai-collective/jeopardy
    type: jeopardy
sequence_len: 4096
sample_packing: true
sample_packing_sequentially: true
curriculum_sampling: true
adapter: lora
lora_r: 64
lora_alpha: 32
lora_target_linear: true
micro_batch_size: 2
num_epochs: 1
lr_scheduler: cosine
learning_rate: 0.000003
warmup_steps: 0.1
bf16: auto
"""

LISA_FFT = """
base_model: NousResearch/Llama-2-7b-hf
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
sequence_len: 4096
adapter:
lora_r:
lisa_n_layers: 4
lisa_step_interval: 20
lisa_layers_attribute: model.layers
optimizer: adamw_torch
learning_rate: 5e-5
tokens:
  pad_token: "<unk>"
"""

QAT_MXFP4 = """
base_model: meta-llama/Llama-3.2-3B
datasets:
  - path: yahma/alpaca-cleaned
    type: alpaca
qat:
  activation_dtype: mxfp4
  weight_dtype: mxfp4
  group_size: 32
sequence_len: 512
micro_batch_size: 1
learning_rate: 2e-5
"""

QAT_NVFP4 = QAT_MXFP4.replace("mxfp4", "nvfp4").replace("group_size: 32", "group_size: 16")

QAT_TERNARY = QAT_MXFP4.replace("activation_dtype: mxfp4", "activation_dtype: int8").replace(
    "weight_dtype: mxfp4\n  group_size: 32", "weight_dtype: ternary\n  quantize_embedding: true"
)

FSDP2_BNB_ADAMW = FSDP2_LORA + "optimizer: paged_adamw_8bit\n"

RELORA_QLORA_OTEL = """
base_model: NousResearch/Llama-2-7b-hf
load_in_4bit: true
adapter: qlora
lora_r: 8
lora_alpha: 16
lora_target_linear: true
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
relora: true
relora_prune_ratio: 0.9
relora_cpu_offload: false
jagged_restart_steps: 150
jagged_restart_warmup_steps: 10
jagged_restart_anneal_steps: false
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
use_otel_metrics: true
otel_metrics_host: "localhost"
otel_metrics_port: 8000
"""

# name → (config, exit code of `sft validate --portable`, texts the output must hold)
CASES = {
    "lora-llama3": (LORA_LLAMA3, 0, ["warning: lora_qkv_kernel", "only changes speed"]),
    "qlora-mistral": (QLORA_MISTRAL, 0, []),
    "full-ft-cce-deepspeed": (
        FULL_FT_CCE,
        0,
        ["warning: cut_cross_entropy", "runs as sft's chunked cross-entropy"],
    ),
    "fsdp2-lora-regex": (FSDP2_LORA, 0, ["warning: fsdp_config.sync_module_states"]),
    "moe": (MOE, 0, []),
    "moe-expert-parallel": (
        MOE_EXPERT_PARALLEL,
        4,
        ["cannot be sharded by transformers' FSDP2 (expert_parallel_size)"],
    ),
    "moe-expert-parallel-bf16": (
        MOE_EXPERT_PARALLEL_BF16,
        0,
        ["warning: expert_parallel_size", "cannot resume from them"],
    ),
    "hsdp": (HSDP, 0, []),
    "dpo": (DPO, 4, ["rl` — "]),
    "multimodal": (MULTIMODAL, 4, ["processor_type` — "]),
    "mistral-common": (MISTRAL_COMMON, 0, []),
    "mistral-common-alpaca": (
        MISTRAL_COMMON_ALPACA,
        4,
        ["'alpaca' renders text, and a mistral-common tokenizer cannot map tokens back"],
    ),
    "unknown-integration": (UNKNOWN_INTEGRATION, 4, ["no installed sft plugin stands in for"]),
    "curriculum-alpaca-phi-jeopardy": (CURRICULUM, 0, []),
    "lisa-full-ft-old-tokens-table": (LISA_FFT, 0, []),
    "qat-mxfp4": (QAT_MXFP4, 0, []),
    "qat-nvfp4": (QAT_NVFP4, 0, []),
    "qat-ternary": (QAT_TERNARY, 0, []),
    "fsdp2-lora-paged-adamw-8bit": (FSDP2_BNB_ADAMW, 0, []),
    "relora-qlora-otel-metrics": (RELORA_QLORA_OTEL, 0, []),
    "relora-without-restart-steps": (
        RELORA_QLORA_OTEL.replace("jagged_restart_steps: 150", ""),
        4,
        ["relora (line 11): needs jagged_restart_steps"],
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_axolotl_style_config_gets_its_verdict(name, tmp_path, plugins, capsys, monkeypatch):
    from sft.cli import main

    text, expected_rc, expected = CASES[name]
    monkeypatch.chdir(tmp_path)
    config = tmp_path / f"{name}.yml"
    config.write_text(textwrap.dedent(text))
    rc = main(["validate", "--portable", str(config)])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert rc == expected_rc, output
    for fragment in expected:
        assert fragment in output, output
    assert "Traceback" not in output
    if expected_rc:  # refused only for named unsupported features, never "unknown key"
        assert "unknown key" not in output, output
