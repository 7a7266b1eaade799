"""Edge cases with a defined behaviour: each either trains or stops early with a message saying what to change."""

import copy
import json
import logging

import pytest
from datasets import Dataset
from transformers import PrinterCallback

from hfrlhf.data.errors import DataError
from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.trainers.kto import KTOConfig, KTOTrainer
from hfrlhf.trainers.reward import RewardConfig, RewardTrainer

PAIRS = [{"prompt": "Hi", "chosen": " yes", "rejected": " no"},
         {"prompt": "Count", "chosen": " one two", "rejected": " four"},
         {"prompt": "The food", "chosen": " was good", "rejected": " boring"}]
CHAT = [{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": "no"}]}]


def _args(tmp_path, cls=DPOConfig, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", per_device_train_batch_size=8,
                max_steps=1, logging_steps=1, disable_tqdm=True, seed=0, max_length=32)
    base.update(kw)
    return cls(**base)


def _dpo(tmp_path, tok, data, **kw):
    trainer = DPOTrainer(build_tiny_llama(tok, seed=1), args=_args(tmp_path, **kw), train_dataset=data,
                         processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    return trainer


@pytest.mark.parametrize("data", [[], Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []})],
                         ids=["list", "dataset"])
def test_empty_dataset_is_a_data_error(tmp_path, tok, data):
    with pytest.raises(DataError, match="expected at least one row, got none"):
        _dpo(tmp_path, tok, data)


def test_every_row_dropped_is_an_error_not_an_empty_run(tmp_path, tok):
    rows = [{"prompt": "Hi " * 40, "chosen": " yes", "rejected": " no"}]
    with pytest.raises(ValueError, match="train_dataset is empty after tokenization: every row"):
        _dpo(tmp_path, tok, rows, drop_invalid_rows=True)


def test_dataset_smaller_than_a_batch_trains_on_a_smaller_batch(tmp_path, tok):
    trainer = _dpo(tmp_path, tok, PAIRS, max_steps=2)  # 3 rows, batch 8
    trainer.train()
    assert trainer.state.global_step == 2
    assert [h["epoch"] for h in trainer.state.log_history if "loss" in h] == [1.0, 2.0]  # one batch of 3 per epoch
    assert len(trainer.get_train_dataloader()) == 1


def test_listwise_row_with_one_response_names_row_and_field(tmp_path, tok):
    rows = [{"prompt": "Hi", "responses": [" yes", " no"], "scores": [1.0, 0.0]},
            {"prompt": "Hi", "responses": [" yes"], "scores": [1.0]}]
    with pytest.raises(DataError, match=r"row 1, field 'responses': expected a list of at least 2") as info:
        _dpo(tmp_path, tok, rows, loss_type="pro")
    assert info.value.row == 1 and info.value.field == "responses"


def test_kto_batch_with_a_single_label_kind_trains_with_finite_loss(tmp_path, tok):
    rows = [{"prompt": p["prompt"], "completion": p["chosen"], "label": True} for p in PAIRS]
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), args=_args(tmp_path, KTOConfig, max_steps=2),
                         train_dataset=rows, processing_class=tok)
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(loss == loss and abs(loss) < float("inf") for loss in losses)
    assert trainer.nonfinite_skipped == 0


def test_prompt_longer_than_max_length(tmp_path, tok):
    rows = PAIRS + [{"prompt": "The quick brown fox " * 20, "chosen": " yes", "rejected": " no"}]
    # by default: an error naming the row and the field, and the two settings that fix it
    with pytest.raises(DataError, match=r"row 3, field 'prompt': the prompt has \d+ tokens.*max_length=32"):
        _dpo(tmp_path, tok, rows)
    # with max_prompt_length: the prompt keeps its end and the row trains
    kept = _dpo(tmp_path, tok, rows, max_prompt_length=16)
    assert len(kept.train_dataset) == 4 and kept.train_dataset[3]["truncated"]
    assert kept.train_dataset[3]["num_prompt_tokens"] <= 16
    assert all(r["num_prompt_tokens"] + max(r["num_completion_tokens"]) <= 32 for r in kept.train_dataset)
    # with drop_invalid_rows: the row is dropped with a warning
    with pytest.warns(UserWarning, match="dropped 1 of 4 rows"):
        dropped = _dpo(tmp_path, tok, rows, drop_invalid_rows=True)
    assert len(dropped.train_dataset) == 3


def test_tokenizer_without_pad_token(tmp_path, tok):
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    # every trainer pads with EOS, as TRL does (padding is never scored; the reward is read at each sequence's
    # own last token, not at pads) ...
    dpo = _dpo(tmp_path, copy.deepcopy(no_pad), PAIRS)
    assert dpo.processing_class.pad_token_id == tok.eos_token_id
    dpo.train()
    rm = RewardTrainer(build_tiny_llama(tok, seed=1), args=_args(tmp_path, RewardConfig), train_dataset=PAIRS,
                       processing_class=copy.deepcopy(no_pad))
    assert rm.processing_class.pad_token_id == tok.eos_token_id
    rm.remove_callback(PrinterCallback)
    rm.train()
    # ... and a tokenizer with neither a pad nor an EOS token is refused, with the fix in the message
    bare = copy.deepcopy(no_pad)
    bare.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token to pad with: set tokenizer.pad_token"):
        _dpo(tmp_path, bare, PAIRS)


def test_model_without_chat_template(tmp_path, tok):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"row 0, field 'prompt': the data is chat messages but the tokenizer has no "
                                        r"chat template"):
        _dpo(tmp_path, plain, CHAT)
    trainer = _dpo(tmp_path, plain, PAIRS)  # plain-text rows need no template
    trainer.train()
    assert trainer.state.global_step == 1


def test_existing_non_empty_output_dir(tmp_path, tok, caplog):
    out = tmp_path / "out"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({"global_step": 5}))
    (out / "notes.txt").write_text("kept")
    trainer = _dpo(tmp_path, tok, PAIRS, save_strategy="steps", save_steps=1)
    with caplog.at_level(logging.WARNING, logger="hfrlhf.trainers.base"):
        trainer.train()
    # a fresh run: warned about the earlier checkpoints, wrote its own next to them, left other files alone
    assert "already holds checkpoints from an earlier run (checkpoint-5)" in caplog.text
    assert trainer.state.global_step == 1 and (out / "checkpoint-1" / "trainer_state.json").is_file()
    assert (out / "notes.txt").read_text() == "kept" and (out / "checkpoint-5").is_dir()


def test_a_prompt_too_long_in_converted_data_names_the_source_row(tmp_path, tok):
    """KTO unpairs the pairs (source row 2 becomes records 4 and 5) and DPO splits listwise rows into pairs (source
    row 1 follows the 3 pairs of row 0): the error names the row of the data given, not of the converted records."""
    long = "Hi " * 40
    pairs = [*PAIRS[:2], {"prompt": long, "chosen": " yes", "rejected": " no"}]
    with pytest.raises(DataError) as err:
        KTOTrainer(build_tiny_llama(tok, seed=1), args=_args(tmp_path, KTOConfig), train_dataset=pairs,
                   processing_class=tok)
    assert (err.value.row, err.value.field) == (2, "prompt")
    assert str(err.value).startswith("train_dataset: row 2, field 'prompt': the prompt has")
    listwise = [{"prompt": "Hi", "responses": [" a", " b", " c"], "scores": [1.0, 2.0, 3.0]},
                {"prompt": long, "responses": [" a", " b"], "scores": [1.0, 2.0]}]
    with pytest.raises(DataError) as err:
        _dpo(tmp_path, tok, listwise)
    assert (err.value.row, err.value.field) == (1, "prompt")


def test_listwise_rows_of_tied_scores_only_say_why_no_pair_is_left(tmp_path, tok):
    rows = [{"prompt": "Hi", "responses": [" yes", " no"], "scores": [1.0, 1.0]}]
    with pytest.raises(ValueError, match="empty after converting its 1 listwise rows to pairwise records: no prompt "
                                         "has two responses with different scores"):
        _dpo(tmp_path, tok, rows)


@pytest.mark.parametrize("loss_type", ["lipo", "pro"])
def test_listwise_rows_of_tied_scores_only_are_refused_for_a_listwise_loss(tmp_path, tok, loss_type):
    rows = [{"prompt": "Hi", "responses": [" yes", " no"], "scores": [1.0, 1.0]},
            {"prompt": "Count", "responses": [" one", " two", " six"], "ranks": [2, 2, 2]}]
    with pytest.raises(ValueError, match="train_dataset: every row's scores tie, so a ranking loss has nothing"):
        _dpo(tmp_path, tok, rows, loss_type=loss_type)
    rows[1]["ranks"] = [1, 2, 2]  # one row with a pair is enough: the tied row adds nothing, and takes nothing
    _dpo(tmp_path, tok, rows, loss_type=loss_type).train()
