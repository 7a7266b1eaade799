"""Already tokenized data given to KTO and PPO is checked before training: a bad token id is named by row and column."""

from __future__ import annotations

import pytest
from datasets import Dataset

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
