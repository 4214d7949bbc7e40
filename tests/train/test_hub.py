"""Pushing to the Hugging Face Hub: the exact calls to huggingface_hub (no network here — the
upload path is the library's; `HfApi.create_repo` / `create_branch` / `upload_folder` are
recorded, and what `upload_folder` would send is computed with its own file filter)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sft.errors import ConfigError, ModelError

DATA = '[[datasets]]\npath = "org/data"\ntype = "alpaca"\n'


@pytest.fixture
def hub(monkeypatch):
    """A Hub that records calls: returns the list of (method, arguments, files it would send)."""
    import huggingface_hub
    from huggingface_hub import HfApi, constants
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the validate-time check
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    calls: list[tuple[str, dict, list[str]]] = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}, []))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}, []))

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        paths = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        sent = list(
            filter_repo_objects(
                paths,
                allow_patterns=kwargs.get("allow_patterns"),
                ignore_patterns=kwargs.get("ignore_patterns"),
            )
        )
        calls.append(("upload_folder", kwargs, sent))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_a_lora_run_pushes_each_checkpoint_and_then_exactly_its_result(tiny_project, hub):
    from sft.train.run import train

    config = tiny_project(
        "adapter=lora",
        "lora_r=4",
        "max_steps=4",
        "save_steps=2",
        "hub_model_id=me/tiny-adapter",
        "hub_strategy=all_checkpoints",
        "hub_revision=trial",
    )
    out = train(config).output_dir
    assert [call[0] for call in hub] == ["create_repo", "create_branch"] + ["upload_folder"] * 5
    assert hub[0][1] == {"repo_id": "me/tiny-adapter", "private": True, "exist_ok": True}
    assert hub[1][1] == {"repo_id": "me/tiny-adapter", "branch": "trial", "exist_ok": True}
    uploads = [call for call in hub if call[0] == "upload_folder"]
    for kwargs, _ in (call[1:] for call in uploads):
        assert kwargs["repo_id"] == "me/tiny-adapter" and kwargs["revision"] == "trial"

    model_2, folder_2, model_4, folder_4, result = uploads
    # each checkpoint: its model files to the repo root, then the whole folder as checkpoint-N/
    assert model_2[1]["folder_path"] == str(out / "checkpoint-2")
    assert "adapter_model.safetensors" in model_2[2] and "adapter_config.json" in model_2[2]
    assert "optimizer.pt" not in model_2[2] and "trainer_state.json" not in model_2[2]
    assert folder_2[1]["path_in_repo"] == "checkpoint-2" and "optimizer.pt" in folder_2[2]
    assert model_4[1]["folder_path"] == str(out / "checkpoint-4")
    assert folder_4[1]["path_in_repo"] == "checkpoint-4"
    # the result: the files this run wrote into output_dir, nothing else
    assert result[1]["folder_path"] == str(out)
    sent = set(result[2])
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "tokenizer.json",
        "README.md",
        "sft_config.yaml",
        "metrics.jsonl",
    } <= sent
    assert not [name for name in sent if "/" in name or name.startswith(".")]  # no checkpoint
    assert result[1]["commit_message"].startswith("sft: adapter fine-tuned from ")

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "AutoPeftModelForCausalLM.from_pretrained('me/tiny-adapter')" in card


def test_hub_strategy_end_pushes_only_the_result(tiny_project, hub):
    from sft.train.run import train

    train(tiny_project("max_steps=2", "save_steps=1", "hub_model_id=me/full", "hub_strategy=end"))
    assert [call[0] for call in hub] == ["create_repo", "upload_folder"]
    assert "model.safetensors" in hub[1][2] and "config.json" in hub[1][2]


def test_push_to_hub_false_pushes_nothing(tiny_project, hub):
    from sft.train.run import train

    result = train(tiny_project("max_steps=1", "hub_model_id=me/x", "push_to_hub=false"))
    assert hub == [] and "from_pretrained(" in (result.output_dir / "README.md").read_text()


def test_a_repo_that_cannot_be_created_stops_the_run_before_training(
    tiny_project, hub, monkeypatch
):
    from huggingface_hub import HfApi

    from sft.train.run import train

    def refuse(self, repo_id, **kwargs):
        raise PermissionError("403 Forbidden: no write access")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    config = tiny_project("max_steps=1", "hub_model_id=someone-else/x")
    with pytest.raises(ModelError, match="cannot create or reach the Hub repo 'someone-else/x'"):
        train(config)
    assert not (tiny_project.tmp_path / "out" / "metrics.jsonl").exists()


def test_a_failed_final_push_says_the_model_is_saved_and_how_to_upload_it(
    tiny_project, hub, monkeypatch
):
    from huggingface_hub import HfApi

    from sft.train.run import train

    def fail(self, **kwargs):
        raise ConnectionError("the network is down")

    monkeypatch.setattr(HfApi, "upload_folder", fail)
    with pytest.raises(ModelError) as caught:
        train(tiny_project("max_steps=1", "hub_model_id=me/x", "hub_strategy=end"))
    out = tiny_project.tmp_path / "out"
    assert f"the model is saved in {out}" in str(caught.value)
    assert f"hf upload me/x {out}" in str(caught.value)
    assert (out / "model.safetensors").exists()


# -- validation --------------------------------------------------------------------------------


def problems_of(make_config, text: str) -> dict:
    with pytest.raises(ConfigError) as caught:
        make_config(text + DATA)
    return {p.path: p for p in caught.value.problems}


def test_hub_keys_without_hub_model_id_are_errors(make_config):
    problems = problems_of(
        make_config, 'push_to_hub = true\nhub_strategy = "end"\nhub_private_repo = false\n'
    )
    assert problems["push_to_hub"].message == "needs hub_model_id: the Hub repo to push to"
    assert problems["hub_strategy"].message == (
        "has no effect: nothing is pushed to the Hub without hub_model_id"
    )
    assert "hub_private_repo" in problems


def test_a_malformed_repo_id_is_an_error(make_config, hub):
    problems = problems_of(make_config, 'hub_model_id = "me/my model"\n')
    assert "is not a Hub repo id" in problems["hub_model_id"].message


def test_no_token_or_offline_mode_is_a_machine_problem(make_config, hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    problem = problems_of(make_config, 'hub_model_id = "me/x"\n')["hub_model_id"]
    assert problem.machine and "no Hugging Face token" in problem.message
    assert "hf auth login" in problem.hint
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    problem = problems_of(make_config, 'hub_model_id = "me/x"\n')["hub_model_id"]
    assert problem.machine and "HF_HUB_OFFLINE is set" in problem.message


def test_hub_keys_with_push_to_hub_false_are_warnings(make_config):
    config = make_config(
        f'hub_model_id = "me/x"\npush_to_hub = false\nhub_strategy = "end"\n{DATA}'
    )
    (warning,) = config.warnings
    assert warning.path == "hub_strategy" and "push_to_hub = false" in warning.message


@pytest.mark.parametrize(
    ("strategy", "folder"),
    [("every_save", None), ("checkpoint", "last-checkpoint"), ("all_checkpoints", "checkpoint-3")],
)
def test_each_strategy_pushes_what_it_names_at_a_save(make_config, hub, tmp_path, strategy, folder):
    from sft.train.hub import HubPush

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt"):
        (checkpoint / name).write_text("x")
    config = make_config(DATA, "hub_model_id=me/model", f"hub_strategy={strategy}")
    HubPush(config, lambda text: None).push_checkpoint(checkpoint, 3)
    uploads = [(kwargs.get("path_in_repo"), sent) for _, kwargs, sent in hub]
    expected = [(None, ["adapter_config.json", "adapter_model.safetensors"])]
    if folder:
        expected.append(
            (folder, ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"])
        )
    assert uploads == expected
