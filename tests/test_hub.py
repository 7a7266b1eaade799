"""Model cards, the files pushed, the push itself against an endpoint the test controls, and merging."""

import json
import logging
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file

from hfrlhf.hub import BUNDLED_HUB_ID, ModelCard, base_model_id, card_metadata, files_to_push, push_to_hub
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_TESTTOKENnotARealOne1234567890"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model runs are dominated by thread start-up and contention: one intra-op thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def no_real_hub(monkeypatch):
    """Any request that slips past the intercepted upload boundary goes to a closed local port, never the Hub."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_TOKEN", raising=False)


class FakeHub:
    """Stands in for the Hub at ``HfApi``'s upload boundary: records repos, branches and uploaded files."""

    def __init__(self):
        self.repos, self.branches, self.uploads, self.tokens = [], [], [], []

    def install(self, monkeypatch):
        from huggingface_hub import HfApi

        hub = self

        def create_repo(api, repo_id, *, private=None, exist_ok=False, repo_type=None, **kw):
            hub.repos.append({"repo_id": repo_id, "private": private, "repo_type": repo_type})
            hub.tokens.append(api.token)
            return f"local-hub/{repo_id}"

        def create_branch(api, repo_id, *, branch, exist_ok=False, **kw):
            hub.branches.append((repo_id, branch))

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, revision=None, repo_type=None, **kw):
            files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()}
            subdirs = [p.name for p in Path(folder_path).iterdir() if p.is_dir()]
            hub.uploads.append({"repo_id": repo_id, "files": files, "subdirs": subdirs, "revision": revision,
                                "message": commit_message})
            hub.tokens.append(api.token)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        return self


@pytest.fixture
def fake_hub(monkeypatch):
    return FakeHub().install(monkeypatch)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _card(**kw):
    base = dict(method="dpo", base_model=BUNDLED_HUB_ID, adapter=True, datasets=["trl-lib/ultrafeedback_binarized"],
                hyperparameters={"learning_rate": 5e-5, "beta": 0.1, "loss_type": ["sigmoid"], "lora_r": 16},
                metrics={"eval_rewards/accuracies": 0.875, "eval_loss": 0.41},
                metrics_before={"eval_rewards/accuracies": 0.0, "eval_loss": 0.693}, repo_id="me/smol-dpo")
    base.update(kw)
    return ModelCard(**base)


# --- the card ----------------------------------------------------------------------------------------------
def test_card_metadata_for_an_adapter():
    text = _card().render()
    meta = card_metadata(text)
    assert meta["base_model"] == BUNDLED_HUB_ID
    assert meta["library_name"] == "peft"
    assert {"hfrlhf", "dpo", "lora"} <= set(meta["tags"])
    assert meta["datasets"] == ["trl-lib/ultrafeedback_binarized"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "| beta | 0.1 |" in text and "| learning_rate | 5e-05 |" in text and "| loss_type | sigmoid |" in text
    assert "| eval_rewards/accuracies | 0 | 0.875 |" in text  # before and after
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/smol-dpo")' in text


def test_card_for_a_full_reward_model_without_hub_data():
    card = _card(method="reward", adapter=False, reward_model=True, datasets=[], data_description="`pairs.jsonl`",
                 metrics_before=None, quantized=False)
    text = card.render()
    meta = card_metadata(text)
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-classification"
    assert "datasets" not in meta and "reward" in meta["tags"] and "reward-model" in meta["tags"]
    assert "AutoModelForSequenceClassification" in text and "`pairs.jsonl`" in text


def test_base_model_id():
    assert base_model_id("smollm2-135m-instruct") == BUNDLED_HUB_ID
    assert base_model_id("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"
    assert base_model_id(str(ROOT)) is None  # a local folder is no Hub id
    assert base_model_id(str(ROOT), "org/base") == "org/base"


# --- what gets pushed --------------------------------------------------------------------------------------
def _adapter_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "README.md", "training_curves.png", "training_args.bin", "trainer_state.json",
                 "run_config.yaml", "model.safetensors"):
        (folder / name).write_text("x")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "adapter_model.safetensors").write_text("x")
    (folder / "runs").mkdir()
    return folder


def test_files_to_push_keeps_the_adapter_and_leaves_the_rest(tmp_path):
    names = {p.name for p in files_to_push(_adapter_folder(tmp_path))}
    assert names == {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "chat_template.jinja", "README.md", "training_curves.png"}


def test_files_to_push_needs_weights(tmp_path):
    (tmp_path / "README.md").write_text("x")
    with pytest.raises(FileNotFoundError, match="no model or adapter weights"):
        files_to_push(tmp_path)


def test_push_uploads_a_clean_copy_with_the_token(tmp_path, fake_hub):
    folder = _adapter_folder(tmp_path)
    url = push_to_hub(folder, "me/run", token=SECRET, private=True, revision="v1")
    assert url == "local-hub/me/run"
    assert fake_hub.repos == [{"repo_id": "me/run", "private": True, "repo_type": "model"}]
    assert fake_hub.branches == [("me/run", "v1")]
    (upload,) = fake_hub.uploads
    assert set(upload["files"]) == {p.name for p in files_to_push(folder)} and upload["subdirs"] == []
    assert upload["revision"] == "v1" and fake_hub.tokens == [SECRET, SECRET]


# --- a workflow run that pushes ----------------------------------------------------------------------------
def _run_dpo(tiny_model_dir, out, *extra):
    argv = ["dpo_llama.py", "--config", str(ROOT / "recipes/configs/dpo_llama.yaml"),
            "--model_name_or_path", tiny_model_dir, "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "8", "--logging_steps", "1",
            "--bf16", "false", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
            "--disable_tqdm", "true", "--lora_r", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", *extra]
    with mock.patch.object(sys, "argv", argv):
        runpy.run_path(str(ROOT / "recipes/dpo_llama.py"), run_name="__main__")


def test_push_to_hub_sends_the_adapter_and_card_and_never_the_token(tiny_model_dir, tmp_path, fake_hub, capsys,
                                                                   caplog):
    out = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    _run_dpo(tiny_model_dir, out, "--push_to_hub", "--hub_model_id", "me/tiny-dpo", "--hub_token", SECRET,
             "--hub_private_repo", "true", "--base_model_id", "me/tiny-base")

    (upload,) = fake_hub.uploads
    assert upload["repo_id"] == "me/tiny-dpo" and fake_hub.repos[0]["private"] is True
    files = upload["files"]
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "training_curves.png"} <= set(files)
    assert not {"training_args.bin", "trainer_state.json", "run_config.yaml", "model.safetensors"} & set(files)
    assert json.loads(files["adapter_config.json"])["r"] == 4
    assert set(load_file(str(out / "adapter_model.safetensors"))) and all(
        "lora_" in k for k in load_file(str(out / "adapter_model.safetensors")))

    card = files["README.md"].decode()
    meta = card_metadata(card)
    assert meta["base_model"] == "me/tiny-base" and meta["library_name"] == "peft"
    assert {"hfrlhf", "dpo", "lora"} <= set(meta["tags"])
    assert "| beta | 0.1 |" in card and "| max_steps | 2 |" in card and "| lora_r | 4 |" in card
    assert "eval_rewards/accuracies" in card  # the final held-out metrics
    assert "demo_pairwise.jsonl" in card

    # the token authenticated the calls, and went nowhere else
    assert fake_hub.tokens and set(fake_hub.tokens) == {SECRET}
    for name, blob in files.items():
        assert SECRET.encode() not in blob, name
    for path in out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    printed = capsys.readouterr()
    assert SECRET not in printed.out and SECRET not in printed.err
    assert SECRET not in caplog.text
    assert "pushed to: local-hub/me/tiny-dpo" in printed.out


def test_merge_adapter_saves_a_full_safetensors_model_equal_to_base_plus_adapter(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _run_dpo(tiny_model_dir, out, "--merge_adapter", "--eval_fraction", "0")
    merged_dir = out / "merged"
    names = {p.name for p in merged_dir.iterdir()}
    assert "model.safetensors" in names and "config.json" in names and "tokenizer.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names) and "adapter_config.json" not in names

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        a, b, c = merged(ids).logits, with_adapter(ids).logits, base(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-5)  # the adapter learned something, and it is in the merged weights
