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

Checkpoint pushes finish before training goes on (no upload races the rotation of old
checkpoints); one that fails is reported and training continues. A failed final push is an
error that says the model is saved locally and how to upload it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sft.config.schema import Config
from sft.errors import ModelError, Problem

# A Hub repo id: `name` or `namespace/name` (huggingface_hub's rule, checked without importing it).
_REPO_ID = re.compile(r"[\w][\w.-]{0,95}(/[\w][\w.-]{0,95})?")
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
HUB_KEYS = ("hub_strategy", "hub_private_repo", "hub_revision")


def pushing(config: Config) -> bool:
    """Whether this run pushes: `hub_model_id` is set and `push_to_hub` is not false."""
    return bool(config.hub_model_id) and config.push_to_hub is not False


def hub_problems(config: Config) -> list[Problem]:
    """Hub keys that would change nothing, a malformed repo id, and (machine problems) a
    machine that cannot push: offline mode, or no token."""
    from sft.config.ineffective import is_set

    problems = []
    if not config.hub_model_id:
        if config.push_to_hub:
            problems.append(
                Problem(
                    "push_to_hub",
                    "needs hub_model_id: the Hub repo to push to",
                    hint="set hub_model_id = 'your-name/model-name'",
                )
            )
        problems += [
            Problem(
                name,
                "has no effect: nothing is pushed to the Hub without hub_model_id",
                hint=f"set hub_model_id = 'your-name/model-name', or remove {name}",
            )
            for name in HUB_KEYS
            if is_set(config, name)
        ]
        return problems
    if not _REPO_ID.fullmatch(config.hub_model_id) or ".." in config.hub_model_id:
        problems.append(
            Problem(
                "hub_model_id",
                f"{config.hub_model_id!r} is not a Hub repo id",
                hint="write name or your-name/name (letters, digits, '-', '_', '.')",
            )
        )
    if config.push_to_hub is False:
        return problems + [
            Problem(
                name,
                "has no effect: push_to_hub = false",
                hint=f"remove push_to_hub to push, or remove {name}",
                warning=True,
            )
            for name in HUB_KEYS
            if is_set(config, name)
        ]
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:  # a dependency of transformers; only a broken install lacks it
        return problems
    if constants.HF_HUB_OFFLINE:
        problems.append(
            Problem(
                "hub_model_id",
                "cannot push: HF_HUB_OFFLINE is set, so huggingface_hub makes no requests",
                hint="unset HF_HUB_OFFLINE for this run, or remove hub_model_id",
                machine=True,
            )
        )
    elif huggingface_hub.get_token() is None:
        problems.append(
            Problem(
                "hub_model_id",
                "cannot push: no Hugging Face token is set up here",
                hint="run `hf auth login` with a token that can write, or set HF_TOKEN",
                machine=True,
            )
        )
    return problems


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

    def callback(self) -> Any:
        """A TrainerCallback pushing each checkpoint as it is written (main process)."""
        from transformers import TrainerCallback

        from sft.train.output import CHECKPOINT_PREFIX

        push = self

        class HubCheckpoints(TrainerCallback):  # type: ignore[misc]
            def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.is_world_process_zero:
                    folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}{state.global_step}"
                    push.push_checkpoint(folder, state.global_step)

        return HubCheckpoints()


__all__ = ["MODEL_FILES", "HubPush", "hub_problems", "pushing"]
