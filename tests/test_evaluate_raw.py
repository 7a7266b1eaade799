"""``trainer.evaluate(eval_dataset=...)`` takes what the constructor's ``eval_dataset`` takes.

Every expected value comes from the second path: the same rows given as ``eval_dataset`` to the constructor of a
trainer built the same way, evaluated with ``trainer.evaluate()``.
"""

import copy
import json

import pytest
import torch
from datasets import Dataset
from transformers import LlamaForSequenceClassification

from hfrlhf.data.errors import DataError
from hfrlhf.models.tiny import build_tiny_llama
from hfrlhf.trainers.base import HfrlhfTrainer
from hfrlhf.trainers.dpo import DPOConfig, DPOTrainer
from hfrlhf.trainers.kto import KTOConfig, KTOTrainer
from hfrlhf.trainers.ppo import PPOConfig, PPOTrainer
from hfrlhf.trainers.reward import RewardConfig, RewardTrainer, compute_accuracy
from hfrlhf.trainers.sft import SFTConfig, SFTTrainer

PAIRS = [
    {"prompt": "The food was", "chosen": " good and the staff were kind.", "rejected": " cold."},
    {"prompt": "The film was", "chosen": " wonderful.", "rejected": " boring and far too long."},
    {"prompt": "Count to three:", "chosen": " one two three", "rejected": " four five"},
    {"prompt": "Say something kind.", "chosen": " You did well.", "rejected": " I hated every minute."},
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " a terrible question."},
]
BAD_PAIR = {"prompt": "The room was", "chosen": None, "rejected": " dirty."}
UNPAIRED = [{"prompt": p["prompt"], "completion": p[k], "label": k == "chosen"}
            for p in PAIRS for k in ("chosen", "rejected")]
SFT_ROWS = [{"prompt": p["prompt"], "completion": p["chosen"]} for p in PAIRS]
PROMPTS = [{"prompt": p["prompt"]} for p in PAIRS]
TIMING = ("runtime", "samples_per_second", "steps_per_second", "preparation_time")


def _common(tmp_path):
    return dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=1, logging_steps=1,
                disable_tqdm=True, seed=0, max_length=48)


def _values(metrics):
    """The metrics that do not depend on wall-clock time."""
    return {k: v for k, v in metrics.items() if not k.endswith(TIMING)}


def _same(got, expected):
    assert set(got) == set(expected)
    for k in expected:
        assert got[k] == pytest.approx(expected[k], rel=1e-5, abs=1e-6), k


# --- one factory per trainer: build(eval_dataset=None) -> a fresh trainer on fresh, identically seeded models ----
def _dpo(tok, tmp_path, **kw):
    def build(eval_dataset=None):
        args = DPOConfig(**_common(tmp_path), ref_cache_dir=str(tmp_path / "ref"), **kw)
        ref = None if args.precompute_ref_log_probs else build_tiny_llama(tok, seed=2)
        return DPOTrainer(build_tiny_llama(tok, seed=1), ref_model=ref, args=args, train_dataset=PAIRS,
                          eval_dataset=eval_dataset, processing_class=tok)
    return build


def _kto(tok, tmp_path, **kw):
    def build(eval_dataset=None):
        args = KTOConfig(**_common(tmp_path), ref_cache_dir=str(tmp_path / "ref"), **kw)
        ref = None if args.precompute_ref_log_probs else build_tiny_llama(tok, seed=2)
        return KTOTrainer(build_tiny_llama(tok, seed=1), ref_model=ref, args=args, train_dataset=UNPAIRED,
                          eval_dataset=eval_dataset, processing_class=tok)
    return build


def _reward(tok, tmp_path):
    config = copy.deepcopy(build_tiny_llama(tok).config)
    config.num_labels = 1

    def build(eval_dataset=None):
        torch.manual_seed(0)
        model = LlamaForSequenceClassification(config)
        return RewardTrainer(model, args=RewardConfig(**_common(tmp_path)), train_dataset=PAIRS,
                             eval_dataset=eval_dataset, processing_class=tok, compute_metrics=compute_accuracy)
    return build


def _sft(tok, tmp_path):
    def build(eval_dataset=None):
        return SFTTrainer(build_tiny_llama(tok, seed=1), args=SFTConfig(**_common(tmp_path)), train_dataset=SFT_ROWS,
                          eval_dataset=eval_dataset, processing_class=tok)
    return build


def _length_reward(prompts, completions):
    return [len(c) / 10 for c in completions]


def _ppo(tok, tmp_path):
    def build(eval_dataset=None):
        args = PPOConfig(**_common(tmp_path), response_length=4, num_mini_batches=1, num_sample_generations=0)
        return PPOTrainer(args=args, processing_class=tok, model=build_tiny_llama(tok, seed=1),
                          reward_model=_length_reward, train_dataset=PROMPTS, eval_dataset=eval_dataset)
    return build


CASES = {
    "dpo": (lambda tok, tmp: _dpo(tok, tmp), PAIRS, BAD_PAIR, "chosen"),
    "dpo_precomputed": (lambda tok, tmp: _dpo(tok, tmp, precompute_ref_log_probs=True), PAIRS, BAD_PAIR, "chosen"),
    "kto": (lambda tok, tmp: _kto(tok, tmp), UNPAIRED, {"prompt": "Hi", "completion": 5, "label": True}, "completion"),
    "kto_precomputed": (lambda tok, tmp: _kto(tok, tmp, precompute_ref_log_probs=True), UNPAIRED,
                        {"prompt": "Hi", "completion": " there", "label": "maybe"}, "label"),
    "reward": (_reward, PAIRS, BAD_PAIR, "chosen"),
    "sft": (_sft, SFT_ROWS, {"prompt": "Hi", "completion": None}, "completion"),
    "ppo": (_ppo, PROMPTS, {"prompt": None}, "prompt"),
}
PARAMS = sorted(CASES)


@pytest.mark.parametrize("case", PARAMS)
def test_raw_rows_at_evaluate_match_the_constructor_path(tmp_path, tok, case):
    factory, rows, _, _ = CASES[case]
    build = factory(tok, tmp_path)
    expected = _values(build(eval_dataset=rows).evaluate())
    trainer = build()
    _same(_values(trainer.evaluate(eval_dataset=rows)), expected)
    # a datasets.Dataset of the same rows, and a JSONL file of them, are read the same way
    _same(_values(trainer.evaluate(eval_dataset=Dataset.from_list(rows))), expected)
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _same(_values(trainer.evaluate(eval_dataset=str(path))), expected)


@pytest.mark.parametrize("case", PARAMS)
def test_a_bad_row_at_evaluate_names_the_row_and_the_field(tmp_path, tok, case):
    factory, rows, bad, field = CASES[case]
    build = factory(tok, tmp_path)
    with pytest.raises(DataError, match=rf"row {len(rows)}\b.*'{field}'") as at_init:
        build(eval_dataset=[*rows, bad])
    with pytest.raises(DataError, match=rf"row {len(rows)}\b.*'{field}'") as at_evaluate:
        build().evaluate(eval_dataset=[*rows, bad])
    assert str(at_evaluate.value) == str(at_init.value)


@pytest.mark.parametrize("case", PARAMS)
def test_a_dict_of_datasets_gives_prefixed_metrics(tmp_path, tok, case):
    factory, rows, bad, _ = CASES[case]
    build = factory(tok, tmp_path)
    small = rows[:4]
    expected = {}
    for name, data in (("all", rows), ("small", small)):
        for key, value in _values(build(eval_dataset=data).evaluate()).items():
            expected[key.replace("eval_", f"eval_{name}_", 1)] = value
    _same(_values(build().evaluate(eval_dataset={"all": rows, "small": small})), expected)
    # the same dict given to the constructor
    _same(_values(build(eval_dataset={"all": rows, "small": small}).evaluate()), expected)
    # every dataset of the dict is checked before any is evaluated; the error names the dataset
    with pytest.raises(DataError, match=r"eval_dataset\['bad'\]: rows: row"):
        build().evaluate(eval_dataset={"all": rows, "bad": [*rows, bad]})
    with pytest.raises(DataError, match=r"eval_dataset\['bad'\]: rows: row"):
        build(eval_dataset={"all": rows, "bad": [*rows, bad]})


def test_precomputed_reference_after_training_without_a_reference_model_is_refused(tmp_path, tok):
    trainer = _dpo(tok, tmp_path, precompute_ref_log_probs=True)()
    trainer.train()
    with pytest.raises(ValueError, match="cannot be computed after training without a reference model"):
        trainer.evaluate(eval_dataset=PAIRS[:2])


def test_precomputed_reference_at_evaluate_uses_the_reference_model(tmp_path, tok):
    """With an explicit reference, rows given after training get the reference's log-probs, not the policy's."""
    def build(eval_dataset=None):
        args = DPOConfig(**_common(tmp_path), ref_cache_dir=str(tmp_path / "ref"), precompute_ref_log_probs=True,
                         learning_rate=1e-2)
        return DPOTrainer(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), args=args,
                          train_dataset=PAIRS, eval_dataset=eval_dataset, processing_class=tok)

    with_rows = build(eval_dataset=PAIRS)
    with_rows.train()
    without = build()
    without.train()
    _same(_values(without.evaluate(eval_dataset=PAIRS)), _values(with_rows.evaluate()))


class _KindsSFT(SFTTrainer):
    dataset_kinds = ("sft",)


class _NoKindsSFT(SFTTrainer):
    dataset_kinds = ()
    prepare_eval_dataset = HfrlhfTrainer.prepare_eval_dataset


def test_a_subclass_plugs_in_with_dataset_kinds(tmp_path, tok):
    def build(eval_dataset=None, cls=_KindsSFT):
        return cls(build_tiny_llama(tok, seed=1), args=SFTConfig(**_common(tmp_path)), train_dataset=SFT_ROWS,
                   eval_dataset=eval_dataset, processing_class=tok)

    expected = _values(build(eval_dataset=SFT_ROWS).evaluate())
    _same(_values(build().evaluate(eval_dataset=SFT_ROWS)), expected)
    got = _values(build().evaluate(eval_dataset={"a": SFT_ROWS}))
    _same(got, {k.replace("eval_", "eval_a_", 1): v for k, v in expected.items()})
    # a subclass without kinds takes tokenized records and refuses raw rows with a clear error
    tokenized = build(eval_dataset=SFT_ROWS).eval_dataset
    _same(_values(build(cls=_NoKindsSFT).evaluate(eval_dataset=tokenized)), expected)
    with pytest.raises(TypeError, match="cannot prepare a list given to evaluate"):
        build(cls=_NoKindsSFT).evaluate(eval_dataset=SFT_ROWS)


def test_a_name_of_the_constructor_datasets_selects_it(tmp_path, tok):
    def build(eval_dataset=None):
        return _KindsSFT(build_tiny_llama(tok, seed=1), args=SFTConfig(**_common(tmp_path)), train_dataset=SFT_ROWS,
                         eval_dataset=eval_dataset, processing_class=tok)

    expected = _values(build(eval_dataset=SFT_ROWS[:3]).evaluate())
    trainer = build()
    trainer.eval_dataset = {"first": trainer.prepare_eval_dataset(SFT_ROWS[:3]),
                            "rest": trainer.prepare_eval_dataset(SFT_ROWS[3:])}
    _same(_values(trainer.evaluate(eval_dataset="first")), expected)
    both = _values(trainer.evaluate())
    assert {k for k in both if k.endswith("_loss")} == {"eval_first_loss", "eval_rest_loss"}
    assert both["eval_first_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


def test_a_prompt_too_long_in_a_named_eval_dataset_names_that_dataset_once(tmp_path, tok):
    too_long = {"prompt": "The food was " * 20, "chosen": " good.", "rejected": " cold."}
    build = _dpo(tok, tmp_path)
    for call in (lambda data: build(eval_dataset=data), lambda data: build().evaluate(eval_dataset=data)):
        with pytest.raises(DataError) as err:
            call({"all": PAIRS, "long": [*PAIRS, too_long]})
        assert str(err.value).startswith("eval_dataset['long']: row 5, field 'prompt': the prompt has ")
