"""Already tokenized data given to KTO and PPO is checked before training: a bad token id is named by row and column."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from transformers import LlamaForSequenceClassification

from hfrlhf.data.errors import DataError
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers import KTOConfig, KTOTrainer, PPOConfig, PPOTrainer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _common(tmp_path) -> dict:
    return dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=2, max_steps=1, disable_tqdm=True)


def test_kto_names_the_row_with_an_id_outside_the_vocabulary(tmp_path, tok):
    rows = [{"prompt_ids": [5, 6], "completion_ids": [7, 8], "label": True},
            {"prompt_ids": [5, 6], "completion_ids": [7, len(tok) + 3], "label": False}]
    with pytest.raises(DataError, match=r"row 1, field 'completion_ids'.*outside the vocabulary"):
        KTOTrainer(build_tiny_llama(tok), args=KTOConfig(**_common(tmp_path)), train_dataset=Dataset.from_list(rows),
                   processing_class=tok)


def test_kto_names_an_empty_completion(tmp_path, tok):
    rows = [{"prompt_ids": [5, 6], "completion_ids": [], "label": True},
            {"prompt_ids": [5, 6], "completion_ids": [7], "label": False}]
    with pytest.raises(DataError, match=r"row 0, field 'completion_ids'"):
        KTOTrainer(build_tiny_llama(tok), args=KTOConfig(**_common(tmp_path)), train_dataset=Dataset.from_list(rows),
                   processing_class=tok)


def test_ppo_names_the_prompt_row_with_an_id_outside_the_vocabulary(tmp_path, tok):
    rows = [{"prompt": "a", "prompt_ids": [5, 6]}, {"prompt": "b", "prompt_ids": [-1, 6]}]
    args = PPOConfig(**_common(tmp_path), response_length=4, num_sample_generations=0)
    with pytest.raises(DataError, match=r"row 1, field 'prompt_ids'"):
        PPOTrainer(args, tok, build_tiny_llama(tok), reward_model=lambda p, c: [0.0] * len(c),
                   train_dataset=Dataset.from_list(rows))


def test_pretokenized_records_missing_a_column_or_with_nan_scores_stop_before_training(tmp_path, tok):
    """A DPO dataset without 'rejected_ids' used to reach the collator (KeyError in the first step), and NaN scores
    or margins a NaN loss; both are now data errors from the constructor, naming the column (and the row)."""
    from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
    from hfrlhf.trainers.reward import RewardConfig, RewardTrainer

    def dpo(rows):
        return DPOTrainer(build_tiny_llama(tok, seed=1), args=DPOConfig(output_dir=str(tmp_path), report_to=[]),
                          train_dataset=Dataset.from_list(rows), processing_class=tok)

    with pytest.raises(DataError) as err:
        dpo([{"prompt_ids": [5, 6], "chosen_ids": [7]}])
    assert err.value.field == "rejected_ids" and "tokenized pairwise records need the columns ['rejected_ids']" in str(
        err.value)

    def reward(rows, **kw):
        config = copy.deepcopy(build_tiny_llama(tok).config)
        config.num_labels = 1
        return RewardTrainer(LlamaForSequenceClassification(config), train_dataset=Dataset.from_list(rows),
                             args=RewardConfig(output_dir=str(tmp_path), report_to=[], **kw), processing_class=tok)

    pair = {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8]}
    with pytest.raises(DataError, match=r"row 1, field 'margin': expected a finite number, got float nan"):
        reward([{**pair, "margin": 1.0}, {**pair, "margin": float("nan")}])
    listwise = {"prompt_ids": [5, 6], "responses_ids": [[7], [8]]}
    with pytest.raises(DataError, match=r"row 0, field 'scores': expected a finite number, got float inf"):
        reward([{**listwise, "scores": [float("inf"), 1.0]}], loss_type="plackett_luce")
    with pytest.raises(DataError, match=r"field 'scores': tokenized listwise records need the columns \['scores'\]"):
        reward([listwise], loss_type="plackett_luce")
