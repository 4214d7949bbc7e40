"""Push the trained adapter or model to the Hugging Face Hub (`hub_model_id`).

Uploads go through huggingface_hub's own `HfApi.create_repo`, `create_branch` and
`upload_folder`; the token is huggingface_hub's (`hf auth login` or HF_TOKEN). The repo is
created (private unless `hub_private_repo = false`) when the run starts, so a wrong name or a
token without write access stops the run before any training. What is pushed, by
`hub_strategy` (transformers' names and meanings):

- `end`: the result once it is saved: the files of `output_dir` that the run wrote (adapter or
  model, tokenizer, README.md, sft_config.yaml, metrics.jsonl, loss.png) and nothing else.
- `every_save` (the default, as in Axolotl): also the model files of each checkpoint when it
  is written.
- `checkpoint`: also the whole latest checkpoint to `last-checkpoint/` (to resume elsewhere).
- `all_checkpoints`: also every checkpoint to `checkpoint-N/`.

Only the training path imports this module (it imports transformers); `sft validate` checks
the Hub keys in `sft.train.tracking`.

Checkpoint pushes finish before training goes on (no upload races the rotation of old
checkpoints); one that fails is reported and training continues. A failed final push is an
error that says the model is saved locally and how to upload it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from sft.config.schema import Config
from sft.errors import ModelError
from sft.train.output import CHECKPOINT_PREFIX

# The files of a checkpoint that make the model (not the optimizer or trainer state).
MODEL_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "adapter_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
)


class HubPush:
    """The pushes of one run (main process only): the repo at the start, checkpoints as they
    are written (`callback`), the result at the end (`push_result`)."""

    def __init__(self, config: Config, say: Callable[[str], None]) -> None:
        self.config = config
        self.say = say
        self.repo_id = config.hub_model_id or ""

    def create_repo(self) -> None:
        """Create the repo (and branch) now: a wrong name or token fails before training."""
        from huggingface_hub import HfApi

        api = HfApi()
        try:
            url = api.create_repo(self.repo_id, private=self.config.hub_private_repo, exist_ok=True)
            self.repo_id = getattr(url, "repo_id", None) or self.repo_id
            if self.config.hub_revision:
                api.create_branch(self.repo_id, branch=self.config.hub_revision, exist_ok=True)
        except Exception as exc:  # huggingface_hub raises HTTP, auth and validation errors
            raise ModelError(
                f"cannot create or reach the Hub repo {self.repo_id!r}: {type(exc).__name__}: "
                f"{exc}\n  fix: check hub_model_id and that your token (`hf auth login`) can "
                "write to it; or remove hub_model_id"
            ) from exc

    def _upload(self, folder: Path, message: str, **kwargs: Any) -> None:
        from huggingface_hub import HfApi

        HfApi().upload_folder(
            repo_id=self.repo_id,
            folder_path=str(folder),
            commit_message=message,
            revision=self.config.hub_revision,
            **kwargs,
        )

    def push_checkpoint(self, checkpoint: Path, step: int) -> None:
        """At each save (strategies other than `end`): the checkpoint's model files to the
        repo root, and for `checkpoint` / `all_checkpoints` the whole checkpoint folder."""
        strategy = self.config.hub_strategy
        if strategy == "end" or not checkpoint.is_dir():
            return
        try:
            self._upload(checkpoint, f"sft: step {step}", allow_patterns=list(MODEL_FILES))
            if strategy in ("checkpoint", "all_checkpoints"):
                folder = "last-checkpoint" if strategy == "checkpoint" else checkpoint.name
                self._upload(checkpoint, f"sft: step {step}, checkpoint", path_in_repo=folder)
        except Exception as exc:  # the network: training goes on, the final push retries
            self.say(
                f"warning: pushing {checkpoint.name} to the Hub failed ({type(exc).__name__}: "
                f"{exc}); training goes on, and the result is pushed at the end"
            )
            return
        self.say(f"pushed {checkpoint.name} to the Hub ({self.repo_id})")

    def push_result(self, output_dir: Path, files: list[str], what: str) -> None:
        """The run's result: exactly `files` (those the run wrote into `output_dir`)."""
        try:
            self._upload(
                output_dir,
                f"sft: {what} fine-tuned from {self.config.base_model}",
                allow_patterns=sorted(files),
            )
        except Exception as exc:
            raise ModelError(
                f"the {what} is saved in {output_dir}, but pushing it to the Hub repo "
                f"{self.repo_id!r} failed: {type(exc).__name__}: {exc}\n"
                f"  fix: upload it with `hf upload {self.repo_id} {output_dir}` once the Hub "
                "is reachable"
            ) from exc
        where = f" (branch {self.config.hub_revision})" if self.config.hub_revision else ""
        self.say(f"pushed {what} to https://huggingface.co/{self.repo_id}{where}")

    def callback(self) -> HubCheckpoints:
        """A TrainerCallback pushing each checkpoint as it is written (main process)."""
        return HubCheckpoints(self)


class HubCheckpoints(TrainerCallback):  # type: ignore[misc]
    """Pushes each checkpoint once the Trainer has written it (main process)."""

    def __init__(self, push: HubPush) -> None:
        self.push = push

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
            self.push.push_checkpoint(folder, state.global_step)


__all__ = ["MODEL_FILES", "HubCheckpoints", "HubPush"]
