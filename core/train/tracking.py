"""Experiment tracking: which trackers a run reports to, with what environment, and closing them;
and the checks of the Hub keys (pushing itself is `sft.train.hub`).

The logging itself is done by transformers' own integrations (`report_to`): TensorBoard,
Weights & Biases, MLflow and Comet. sft maps Axolotl's keys onto `report_to`, `run_name` and
the environment variables those integrations read (WANDB_PROJECT, MLFLOW_TRACKING_URI,
COMET_PROJECT_NAME, ...). Only the variables the config sets are set, only for the run: the
previous environment is put back when it ends, so a later run in the same Python process does
not inherit them. The runs that W&B, MLflow and Comet keep open per process are closed when the
run ends, failed or not.

No torch import here: `sft validate` calls `tracking_problems`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs

from sft.config.schema import Config
from sft.errors import ModelError, Problem

# A Hub repo id: `name` or `namespace/name` (huggingface_hub's rule, checked without importing it).
_REPO_ID = re.compile(r"[\w][\w.-]{0,95}(/[\w][\w.-]{0,95})?")


@attrs.frozen
class Tracker:
    """One `report_to` integration: its name there, the module it needs, the sft-train extra
    that installs it, and the config keys that configure it."""

    name: str
    label: str
    module: str
    extra: str
    keys: tuple[str, ...]
    switch: str  # the key (or keys) that turn it on, for messages


TENSORBOARD = Tracker(
    "tensorboard", "TensorBoard", "tensorboard", "tensorboard", ("use_tensorboard",), ""
)
WANDB = Tracker(
    "wandb",
    "W&B",
    "wandb",
    "wandb",
    (
        "wandb_entity",
        "wandb_name",
        "wandb_run_id",
        "wandb_mode",
        "wandb_watch",
        "wandb_log_model",
    ),
    "set wandb_project (or use_wandb = true)",
)
MLFLOW = Tracker(
    "mlflow",
    "MLflow",
    "mlflow",
    "mlflow",
    ("mlflow_run_name", "hf_mlflow_log_artifacts"),
    "set mlflow_tracking_uri or mlflow_experiment_name (or use_mlflow = true)",
)
COMET = Tracker(
    "comet_ml",
    "Comet",
    "comet_ml",
    "comet",
    (
        "comet_api_key",
        "comet_workspace",
        "comet_experiment_key",
        "comet_mode",
        "comet_online",
    ),
    "set comet_project_name (or use_comet = true)",
)
TRACKERS = (TENSORBOARD, WANDB, MLFLOW, COMET)


def is_on(tracker: Tracker, config: Config) -> bool:
    """Whether the config turns `tracker` on (Axolotl's rules: a W&B project, an MLflow URI or
    experiment, a Comet project turn theirs on; `wandb_mode = "disabled"` turns W&B off)."""
    if tracker is TENSORBOARD:
        return config.use_tensorboard
    if tracker is WANDB:
        return bool(config.use_wandb or config.wandb_project) and config.wandb_mode != "disabled"
    if tracker is MLFLOW:
        return bool(
            config.use_mlflow or config.mlflow_tracking_uri or config.mlflow_experiment_name
        )
    return bool(config.use_comet or config.comet_project_name)


def enabled(config: Config) -> list[Tracker]:
    return [tracker for tracker in TRACKERS if is_on(tracker, config)]


def report_to(config: Config) -> list[str]:
    """The Trainer's `report_to`. A tracker whose package is missing is a `ModelError` here
    (and a machine problem at `sft validate`), never an ImportError inside the Trainer."""
    from sft.hardware import installed

    names = []
    for tracker in enabled(config):
        if not installed(tracker.module):
            raise ModelError(_missing(tracker) + f"\n  fix: {_install(tracker)}")
        names.append(tracker.name)
    return names


def run_name(config: Config) -> str | None:
    """The Trainer's `run_name`: every tracker gets this one name (W&B's run, MLflow's run,
    Comet's experiment)."""
    if is_on(WANDB, config) and config.wandb_name:
        return config.wandb_name
    if is_on(MLFLOW, config) and config.mlflow_run_name:
        return config.mlflow_run_name
    return None


def environment(config: Config) -> dict[str, str]:
    """The variables the enabled trackers read, for what the config sets (nothing else)."""
    env: dict[str, str] = {}

    def put(name: str, value: object) -> None:
        if value is None or value is False or value == "":
            return
        env[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)

    if is_on(WANDB, config):
        put("WANDB_PROJECT", config.wandb_project)
        put("WANDB_ENTITY", config.wandb_entity)
        put("WANDB_MODE", config.wandb_mode)
        put("WANDB_RUN_ID", config.wandb_run_id)
        if config.wandb_run_id:
            put("WANDB_RESUME", "allow")  # the same id continues its run instead of failing
        put("WANDB_WATCH", config.wandb_watch)
        put("WANDB_LOG_MODEL", config.wandb_log_model)
        if "WANDB_DIR" not in os.environ:  # run files beside the run (wandb's default: the cwd)
            put("WANDB_DIR", str(Path(config.output_dir).resolve()))
    if is_on(MLFLOW, config):
        put("MLFLOW_TRACKING_URI", config.mlflow_tracking_uri)
        put("MLFLOW_EXPERIMENT_NAME", config.mlflow_experiment_name)
        if config.hf_mlflow_log_artifacts:
            put("HF_MLFLOW_LOG_ARTIFACTS", "TRUE")
    if is_on(COMET, config):
        put("COMET_API_KEY", config.comet_api_key)
        put("COMET_WORKSPACE", config.comet_workspace)
        put("COMET_PROJECT_NAME", config.comet_project_name)
        put("COMET_EXPERIMENT_KEY", config.comet_experiment_key)
        put("COMET_START_MODE", config.comet_mode)
        if config.comet_online is not None:
            env["COMET_START_ONLINE"] = "true" if config.comet_online else "false"
    return env


@contextlib.contextmanager
def tracking(config: Config) -> Iterator[dict[str, str]]:
    """Set the trackers' environment for the run; on the way out close the runs they opened
    and put every variable back as it was (removed when it was not set before)."""
    env = environment(config)
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    finished = False
    try:
        yield env
        finished = True
    finally:
        try:
            close_runs(config, finished)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def close_runs(config: Config, finished: bool) -> None:
    """End the W&B run, MLflow run and Comet experiment this process has open, if any.

    transformers leaves them open after training; the next run in the same process would log
    into them. After a failure, an error while closing is not allowed to hide the first one.
    """
    names = {tracker.name for tracker in enabled(config)}
    closers = []
    wandb = sys.modules.get("wandb")
    if "wandb" in names and wandb is not None and getattr(wandb, "run", None) is not None:
        closers.append(lambda: wandb.finish(exit_code=0 if finished else 1))
    mlflow = sys.modules.get("mlflow")
    if "mlflow" in names and mlflow is not None and mlflow.active_run() is not None:
        closers.append(lambda: mlflow.end_run(status="FINISHED" if finished else "FAILED"))
    comet = sys.modules.get("comet_ml")
    running = getattr(comet, "get_running_experiment", None)
    if "comet_ml" in names and running is not None:
        experiment = running()
        if experiment is not None:
            closers.append(experiment.end)
    for close in closers:
        if finished:
            close()
            continue
        with contextlib.suppress(Exception):
            close()


# -- validation --------------------------------------------------------------------------------


def _missing(tracker: Tracker) -> str:
    return f"{tracker.label} logging needs the {tracker.module} package, which is not installed"


def _install(tracker: Tracker) -> str:
    return f"pip install 'sft-train[{tracker.extra}]'"


def tracking_problems(config: Config) -> list[Problem]:
    """Tracker keys that would change nothing, conflicting run names, missing packages (a
    machine problem naming the extra to install), and the Hub keys."""
    from sft.config.ineffective import is_set
    from sft.hardware import installed

    problems = []
    for tracker in (WANDB, MLFLOW, COMET):
        if is_on(tracker, config):
            continue
        if tracker is WANDB and config.wandb_mode == "disabled":
            continue  # switched off on purpose, its settings kept
        for name in tracker.keys:
            if is_set(config, name):
                problems.append(
                    Problem(
                        name,
                        f"has no effect: {tracker.label} logging is off",
                        hint=f"{tracker.switch} to log to {tracker.label}, or remove {name}",
                    )
                )
    if (
        is_on(WANDB, config)
        and is_on(MLFLOW, config)
        and config.wandb_name
        and config.mlflow_run_name
        and config.wandb_name != config.mlflow_run_name
    ):
        problems.append(
            Problem(
                "mlflow_run_name",
                f"conflicts with wandb_name = {config.wandb_name!r}: the trainer gives every "
                "tracker the same run name",
                hint="set one of them (or both to the same name)",
            )
        )
    for tracker in enabled(config):
        if not installed(tracker.module):
            problems.append(
                Problem(
                    tracker.keys[0] if tracker is TENSORBOARD else _switch_key(tracker, config),
                    _missing(tracker) + " here",
                    hint=_install(tracker),
                    machine=True,
                )
            )
    return problems + hub_problems(config)


def _switch_key(tracker: Tracker, config: Config) -> str:
    """The key that turned `tracker` on, to point the problem at it."""
    candidates = {
        "wandb": ("wandb_project", "use_wandb"),
        "mlflow": ("mlflow_tracking_uri", "mlflow_experiment_name", "use_mlflow"),
        "comet_ml": ("comet_project_name", "use_comet"),
    }[tracker.name]
    return next((name for name in candidates if getattr(config, name)), candidates[-1])


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


__all__ = [
    "TRACKERS",
    "close_runs",
    "enabled",
    "environment",
    "hub_problems",
    "pushing",
    "report_to",
    "run_name",
    "tracking",
    "tracking_problems",
]
