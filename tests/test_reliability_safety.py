"""Safe by default: weights written only as safetensors, no arbitrary unpickling on resume, no remote code unless
asked, and a Hub token never printed, logged or written."""

import json
import logging
import pickle

import pytest
import torch
from datasets import Dataset
from transformers import PrinterCallback

from hfrlhf.models.loading import ModelArguments, load_causal_lm, load_reward_model, load_tokenizer
from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer
from hfrlhf.trainers.reward import RewardConfig

SECRET = "hf_reliabilityTestSecret0123456789"
PAIRS = [{"prompt": f"Count {w}", "chosen": f" {w}", "rejected": " no"} for w in ["one", "two", "three", "four"]]
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt", ".safetensors")
# the Trainer's optimizer, scheduler and RNG states: torch files it reads back with torch.load(weights_only=True)
TRAINER_STATE_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}


def _dpo(tmp_path, tok, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], per_device_train_batch_size=2, max_steps=2,
                save_strategy="steps", save_steps=1, logging_steps=1, disable_tqdm=True, seed=0, max_length=32)
    base.update(kw)
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=DPOConfig(**base), train_dataset=Dataset.from_list(PAIRS),
                         processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


def _files(folder):
    return [p for p in folder.rglob("*") if p.is_file()]


# --- only safetensors ------------------------------------------------------------------------------------------------
def test_dpo_checkpoints_and_final_model_hold_weights_only_as_safetensors(tmp_path, tok):
    trainer = _dpo(tmp_path, tok)
    trainer.train()
    trainer.save_model(str(tmp_path / "out" / "final"))
    files = _files(tmp_path / "out")
    weights = [p for p in files if p.suffix in WEIGHT_SUFFIXES and p.name not in TRAINER_STATE_FILES]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights
    assert (tmp_path / "out" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "model.safetensors").is_file()


def test_ppo_checkpoints_hold_weights_only_as_safetensors(tmp_path, tok):
    args = PPOConfig(output_dir=str(tmp_path / "ppo"), report_to=[], per_device_train_batch_size=4, max_steps=1,
                     save_strategy="steps", save_steps=1, disable_tqdm=True, seed=0, response_length=4,
                     num_ppo_epochs=1, num_mini_batches=1, num_sample_generations=0)
    trainer = PPOTrainer(args, tok, build_tiny_llama(tok, seed=1), reward_model=lambda p, c: [0.0] * len(c),
                         train_dataset=[{"prompt": p} for p in ["Hi", "The", "one", "What"]])
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    weights = [p for p in _files(tmp_path / "ppo") if p.suffix in WEIGHT_SUFFIXES and p.name not in TRAINER_STATE_FILES]
    assert weights and all(p.suffix == ".safetensors" for p in weights), weights


# --- no arbitrary unpickling when resuming ---------------------------------------------------------------------------
class _Planted:
    """Unpickling this creates a file: proof that arbitrary code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_does_not_unpickle_arbitrary_objects(tmp_path, tok, name):
    _dpo(tmp_path, tok, max_steps=1).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    marker = tmp_path / "code-ran"
    with open(checkpoint / name, "wb") as f:
        pickle.dump({"state": _Planted(marker)}, f)
    try:
        _dpo(tmp_path, tok, max_steps=2).train(resume_from_checkpoint=str(checkpoint))
    except pickle.UnpicklingError as err:
        assert "Weights only load failed" in str(err)
    assert not marker.exists()


# --- no remote code unless asked ---------------------------------------------------------------------------------------
def _remote_code_model(tmp_path, tok):
    """A model folder whose config points to custom code that, if imported, creates a marker file."""
    folder = tmp_path / "remote"
    build_tiny_llama(tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel",
                          "AutoModelForSequenceClassification": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "remote-code-ran"
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder, marker


def test_trust_remote_code_is_off_by_default(tmp_path, tok):
    assert ModelArguments().trust_remote_code is False
    assert RewardConfig(output_dir=str(tmp_path), report_to=[]).trust_remote_code is False
    folder, marker = _remote_code_model(tmp_path, tok)
    # the folder's own (standard) classes are used; the custom module is never imported
    model = load_causal_lm(str(folder))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert type(load_reward_model(str(folder))).__name__ == "LlamaForSequenceClassification"
    load_tokenizer(str(folder))
    assert not marker.exists()


def test_loaders_pass_trust_remote_code_only_when_asked(tmp_path, tok, monkeypatch):
    import transformers

    seen = []

    def fake(name, *args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake)
    for args in (ModelArguments(model_name_or_path=str(tmp_path)),
                 ModelArguments(model_name_or_path=str(tmp_path), trust_remote_code=True)):
        with pytest.raises(RuntimeError, match="stop here"):
            load_causal_lm(args)
    assert seen == [False, True]


# --- the Hub token ----------------------------------------------------------------------------------------------------
def test_hub_token_is_never_printed_logged_or_written(tmp_path, tok, capsys, caplog):
    with caplog.at_level(logging.DEBUG):
        trainer = _dpo(tmp_path, tok, hub_token=SECRET, logging_steps=1)
        assert trainer.args.hub_token == SECRET  # still usable by the Trainer for pushing
        print(trainer.args, repr(trainer.args), trainer.args.to_json_string())
        logging.getLogger("hfrlhf").info("args: %r", trainer.args)
        trainer.add_callback(PrinterCallback)
        trainer.train()
        trainer.save_model(str(tmp_path / "out" / "final"))
    out = capsys.readouterr()
    for text in (out.out, out.err, caplog.text):
        assert SECRET not in text
    files = _files(tmp_path / "out")
    assert any(p.name == "training_args.bin" for p in files)
    for path in files:
        assert SECRET.encode() not in path.read_bytes(), path
    # the pickled arguments load back (without the token) for tools that read them
    args = torch.load(tmp_path / "out" / "checkpoint-1" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_length == 32
