"""The controlled-sentiment experiment (experiments/sentiment): data building, evaluation maths, a tiny run."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import pytest
import torch

EXPERIMENT = Path(__file__).resolve().parents[1] / "experiments" / "sentiment"
sys.path.insert(0, str(EXPERIMENT))

import frontier  # noqa: E402
import gold_eval as ev  # noqa: E402
import kl_by_position  # noqa: E402
import make_data  # noqa: E402
import prompts  # noqa: E402
import run as runner  # noqa: E402
import sampling  # noqa: E402

pytest.importorskip("vaderSentiment")


# --- prompts ---------------------------------------------------------------------------------------------------------
def test_prompts_train_and_held_out_are_disjoint_in_text_and_topic():
    train, held = prompts.train_prompts(), prompts.held_out_prompts()
    assert len(set(train)) == len(train) >= 300 and len(set(held)) == len(held) >= 100
    assert not set(prompts.TRAIN_TOPICS) & set(prompts.HELD_OUT_TOPICS)
    assert all(any(t in p for t in prompts.HELD_OUT_TOPICS) for p in held)
    everything = prompts.train_prompts(n=1000)
    assert len(everything) == len(prompts.TRAIN_TOPICS) * len(prompts.TRAIN_TEMPLATES)
    assert prompts.train_prompts(n=1000, seed=1) != everything
    assert sorted(prompts.train_prompts(n=1000, seed=1)) == sorted(everything)


# --- data building on hand-made scored samples ---------------------------------------------------------------------
GROUPS = [
    ("p1", ["a", "b", "c", "d"], [0.2, 0.9, -0.4, 0.9]),  # best: b (first of the tie), worst: c
    ("p2", ["e", "f", "g", "h"], [0.0, 0.0, 0.0, 0.0]),  # all tie: no pair, no list
    ("p3", ["i", "j", "k", "l"], [0.5, 0.49, 0.7, -0.1]),
]


def test_pairwise_is_best_against_worst_with_margin():
    data = make_data.build_datasets(GROUPS, threshold=0.5)
    assert data["pairwise"] == [
        {"prompt": "p1", "chosen": "b", "rejected": "c", "margin": 1.3},
        {"prompt": "p3", "chosen": "k", "rejected": "l", "margin": 0.8},
    ]


def test_listwise_keeps_every_completion_with_its_score():
    data = make_data.build_datasets(GROUPS, threshold=0.5)
    assert data["listwise"] == [
        {"prompt": "p1", "responses": ["a", "b", "c", "d"], "scores": [0.2, 0.9, -0.4, 0.9]},
        {"prompt": "p3", "responses": ["i", "j", "k", "l"], "scores": [0.5, 0.49, 0.7, -0.1]},
    ]


def test_unpaired_labels_come_from_the_threshold_inclusive():
    data = make_data.build_datasets(GROUPS, threshold=0.5)
    labels = {(r["prompt"], r["completion"]): r["label"] for r in data["unpaired"]}
    assert len(data["unpaired"]) == 12  # every completion, ties included
    assert [k for k, v in labels.items() if v] == [("p1", "b"), ("p1", "d"), ("p3", "i"), ("p3", "k")]


def test_shipped_data_is_consistent_with_its_samples():
    data_dir = EXPERIMENT / "data"
    if not (data_dir / "meta.json").exists():
        pytest.skip("data not generated")
    meta = json.loads((data_dir / "meta.json").read_text())
    samples = [r for r in make_data.read_jsonl(data_dir / "samples.jsonl") if r["split"] == "train"]
    assert len(samples) == meta["train_prompts"] >= 300
    rebuilt = make_data.build_datasets([(prompts.as_messages(r["prompt"]), r["completions"], r["scores"])
                                        for r in samples], threshold=meta["threshold"])
    for name in ("pairwise", "listwise", "unpaired"):
        assert make_data.read_jsonl(data_dir / f"{name}.jsonl") == rebuilt[name]
    held = set(prompts.held_out_prompts())
    assert not held & {r["prompt"] for r in make_data.read_jsonl(data_dir / "samples.jsonl")}


# --- evaluation maths on hand values -------------------------------------------------------------------------------
def test_win_rate_by_hand():
    # prompt means: policy 0.5 vs ref 0.2 (win), 0.5 vs 0.5 (tie), -0.1 vs 0.0 (loss)
    policy = [0.9, 0.1, 0.5, 0.5, -0.2, 0.0]
    ref = [0.2, 0.2, 0.6, 0.4, 0.0, 0.0]
    assert ev.win_rate(policy, ref, n=2) == pytest.approx((1 + 0.5 + 0) / 3)
    assert ev.win_rate(policy, ref, n=1) == pytest.approx((1 + 0 + 0 + 1 + 0 + 0.5) / 6)
    with pytest.raises(ValueError):
        ev.win_rate(policy, ref[:4], n=2)


def test_kl_on_samples_by_hand_and_against_the_exact_kl():
    assert ev.kl_on_samples(torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-2.0, -2.5, -0.5])) == pytest.approx(0.5)
    # Monte-Carlo estimate of KL(p || q) on samples of p approaches the exact value
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.3, 0.3, 0.4])
    exact = float((p * (p / q).log()).sum())
    draws = torch.multinomial(p, 200000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = ev.kl_on_samples(p.log()[draws], q.log()[draws])
    # 0.7 ln(7/3) + 0.2 ln(2/3) + 0.1 ln(1/4) = 0.5931 - 0.0811 - 0.1386
    assert exact == pytest.approx(0.3734, abs=1e-4) and estimate == pytest.approx(exact, abs=0.01)


def test_results_table_and_docs_markers(tmp_path):
    res = {"seed": 3, "reference": {"gold": 0.25, "length": 30.0, "seconds": 40.0}, "seconds": 600.0, "threads": 1,
           "eval_set": "held-out", "load_average": {"start": 2.0, "end": 3.5}, "workers": [{}, {}],
           "reward_model": {"accuracy": 0.9, "pairs": 300, "accuracy_best_worst": 0.95, "pairs_best_worst": 60,
                            "held_out_accuracy": 0.875, "held_out_pairs": 8, "seconds": 12.0},
           "methods": {"dpo": {"label": "DPO", "gold": 0.75, "win_rate": 0.8, "kl": 4.5, "length": 31.0,
                               "train_seconds": 60.0, "eval_seconds": 30.0}}}
    table = runner.results_table([res])
    assert "| 3 | DPO | 0.750 | +0.500 | 0.80 | 4.50 | 31.0 | 60 s | 30 s |" in table
    assert "| 3 | reference | 0.250 | 0 | 0.50 | 0 | 30.0 | | 40 s |" in table
    assert "pair accuracy 0.900 on the 300 validation pairs, 0.950 on their 60 best-against-worst" in table
    assert "0.875 on 8 held-out pairs" in table
    assert "10.0 min on the held-out prompts, 2 process(es) of 1 thread(s), load average 2.0" in table
    doc = tmp_path / "a.md"
    doc.write_text(f"intro\n{runner.TABLE_START}\nstale rows\n{runner.TABLE_END}\noutro\n")
    pytest.importorskip("matplotlib")
    runner.update_docs([res], doc, tmp_path / "p.png")
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "stale rows" not in text and table in text
    assert (tmp_path / "p.png").stat().st_size > 0


# --- a tiny end-to-end run: every stage and method on tiny models ------------------------------------------------------
def _tiny_experiment(tmp_path: Path) -> runner.Experiment:
    from transformers import LlamaForSequenceClassification

    from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    groups = [(prompts.as_messages(p), [f"good day {i}", f"bad {i}", f"fine {i}", f"ok {i}"],
               [0.8, -0.5, 0.3 + 0.01 * i, 0.1]) for i, p in enumerate(prompts.train_prompts(16))]
    data = make_data.build_datasets(groups[:12], threshold=0.5)
    for name, records in data.items():
        make_data.write_jsonl(tmp_path / "data" / f"{name}.jsonl", records)
    make_data.write_jsonl(tmp_path / "data" / "rm_eval_pairwise.jsonl", make_data.build_datasets(groups[12:])["pairwise"])
    make_data.write_jsonl(tmp_path / "data" / "samples.jsonl",
                          [{"prompt": p[0]["content"], "split": "train" if i < 12 else "rm_eval", "completions": c,
                            "scores": g} for i, (p, c, g) in enumerate(groups)])

    def reward_model():
        config = build_tiny_llama(tok).config
        config.num_labels = 1
        torch.manual_seed(0)
        return LlamaForSequenceClassification(config)

    short = {"max_steps": 2, "logging_steps": 1}
    methods = {name: runner.Method(m.trainer, m.data, {**m.config, **short}, m.reward, m.label)
               for name, m in runner.METHODS.items()}
    for name in ("ppo_rm", "ppo_gold", "rloo"):
        methods[name].config.update(response_length=6, per_device_train_batch_size=2)
    methods["reward_model"].config.update(num_train_epochs=1)
    return runner.Experiment(seed=0, methods=methods, data_dir=tmp_path / "data", output_dir=tmp_path / "out",
                             eval_prompts=prompts.held_out_prompts(4), eval_samples=2,
                             generation=runner.GenerationSettings(max_new_tokens=6, batch_size=4),
                             load_policy=lambda: (build_tiny_llama(tok), tok), load_reward=reward_model)


def test_tiny_pipeline_runs_every_method_and_reports(tmp_path):
    exp = _tiny_experiment(tmp_path)
    results = runner.run(exp, log=lambda s: None)
    assert set(results["methods"]) == set(runner.METHODS) - {"reward_model"}
    rm = results["reward_model"]
    assert 0.0 <= rm["accuracy"] <= 1.0 and rm["pairs"] == 4 * 6  # 4 validation prompts, 6 pairs of different gold each
    assert rm["pairs_best_worst"] == 4 and rm["data"] == runner.METHODS["reward_model"].data
    # held-out pairs: (reference, policy) completions of the same prompt with different gold, from every method
    # (the tiny models' gibberish mostly scores 0, so there may be no such pair here)
    assert rm["held_out_pairs"] == sum(m["rm_pairs"] for m in results["methods"].values())
    assert rm["held_out_accuracy"] is None or 0.0 <= rm["held_out_accuracy"] <= 1.0
    assert all(math.isfinite(m["rm_score"]) for n, m in results["methods"].items())
    for name, m in results["methods"].items():
        assert -1.0 <= m["gold"] <= 1.0 and 0.0 <= m["win_rate"] <= 1.0, name
        assert math.isfinite(m["kl"]) and 1 <= m["length"] <= 6, name
    saved = json.loads((tmp_path / "out" / "results_seed0.json").read_text())
    assert saved["methods"].keys() == results["methods"].keys()


def test_reference_has_zero_kl_and_even_win_rate(tmp_path):
    """An untrained adapter (LoRA B = 0) is the reference: same samples with the same seed, KL 0, win rate 1/2."""
    from peft import get_peft_model

    from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    settings = runner.GenerationSettings(max_new_tokens=6, batch_size=3)
    held = prompts.held_out_prompts(3)
    ref = ev.reference_samples(build_tiny_llama(tok), tok, held, settings, n=2, seed=5)
    policy = get_peft_model(build_tiny_llama(tok), runner._lora("CAUSAL_LM"))
    out = ev.evaluate_policy(policy, tok, held, settings, ref, n=2, seed=5)
    assert out["win_rate"] == 0.5 and out["kl"] == pytest.approx(0.0, abs=1e-5)
    assert out["gold"] == pytest.approx(ref["gold"]) and out["length"] == ref["length"]


def test_chat_prompts_get_assistant_turn_completions():
    data = make_data.build_datasets([(prompts.as_messages("Hi?"), ["yes", "no"], [0.9, -0.2])])
    turn = [{"role": "assistant", "content": "yes"}]
    assert data["pairwise"][0]["chosen"] == turn and data["listwise"][0]["responses"][0] == turn
    assert data["unpaired"][0]["completion"] == turn


# --- the development set, settings, workers --------------------------------------------------------------------------
def test_dev_prompts_are_neither_trained_on_nor_held_out():
    data_dir = EXPERIMENT / "data"
    if not (data_dir / "samples.jsonl").exists():
        pytest.skip("data not generated")
    dev = runner.dev_prompts(data_dir)
    assert len(dev) == len(set(dev)) == 60
    trained = set()
    for name in ("pairwise", "listwise", "unpaired"):
        trained |= {r["prompt"][0]["content"] for r in make_data.read_jsonl(data_dir / f"{name}.jsonl")}
    assert len(trained) == 300 and not set(dev) & trained
    assert not set(dev) & set(prompts.held_out_prompts())
    assert all(len(g["completions"]) == len(g["scores"]) == 4 for g in runner.dev_groups(data_dir))


def test_pair_accuracy_by_hand():
    # group 1 (gold 0.9 > 0.0 > -0.5): rewards order (0,1) right, (0,2) right, (2,1) right -> 3/3
    # group 2: the gold tie (3,4) is no pair; (3,5): gold 0.1 < 0.7, rewards 5 > 4 -> wrong; (4,5): reward tie -> wrong
    rewards = [0.3, 0.1, 0.2, 5.0, 4.0, 4.0]
    gold = [0.9, -0.5, 0.0, 0.1, 0.1, 0.7]
    assert runner.pair_accuracy(rewards, gold, [[0, 1, 2], [3, 4, 5]]) == (3 / 5, 5)
    acc, n = runner.pair_accuracy([1.0, 2.0], [0.5, 0.5], [[0, 1]])
    assert n == 0 and math.isnan(acc)


def test_set_changes_one_setting_and_rejects_unknown_methods():
    methods = runner.apply_settings(runner.METHODS, ["dpo.learning_rate=2e-4", "kto.loss_type=apo", "dpo.data=listwise"])
    assert methods["dpo"].config["learning_rate"] == 2e-4 and methods["dpo"].data == "listwise"
    assert methods["kto"].config["loss_type"] == "apo"
    assert runner.METHODS["dpo"].data == "pairwise" and runner.METHODS["dpo"].config["learning_rate"] != 2e-4
    with pytest.raises(ValueError):
        runner.apply_settings(runner.METHODS, ["nope.beta=1"])


def test_workers_keep_the_reward_model_with_its_users_and_cover_every_method():
    groups = runner.worker_groups(list(runner.METHODS), 2)
    assert len(groups) == 2 and sorted(sum(groups, [])) == sorted(runner.METHODS)
    assert {"reward_model", "ppo_rm", "rloo"} <= set(groups[0])
    assert groups[0].index("reward_model") < groups[0].index("ppo_rm")
    assert runner.worker_groups(["dpo"], 2) == [["dpo"]]


def test_results_files_skip_worker_parts(tmp_path):
    for name in ("results_seed0.json", "results_seed1.json", "results_seed0.worker1.json"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in runner.results_files(tmp_path)] == ["results_seed0.json", "results_seed1.json"]


def test_sampled_logps_equal_a_second_scoring_pass():
    """The policy's log-probs taken from generation (what the KL uses) equal a separate teacher-forced pass."""
    from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer

    tok = build_tiny_tokenizer()
    model = build_tiny_llama(tok, seed=1)
    settings = runner.GenerationSettings(max_new_tokens=8, temperature=0.7, batch_size=5)
    s = sampling.sample(model, tok, prompts.held_out_prompts(4), settings, n=2, seed=3)
    again = sampling.sequence_logps(model, tok, s, temperature=0.7, batch_size=3)
    assert s.logps.shape == again.shape == (8,)
    torch.testing.assert_close(s.logps, again, atol=1e-4, rtol=1e-5)


def test_held_out_pairs_compare_reference_and_policy_completions_of_the_same_prompt(monkeypatch, tmp_path):
    fake = {"good": 1.0, "great": 2.0, "bad": 0.0, "awful": 0.5}
    monkeypatch.setattr(runner, "score_texts", lambda rm, tok, prompts, texts: [fake[t] for t in texts])
    exp = runner.Experiment(eval_prompts=["p1", "p2", "p3"], eval_samples=1, output_dir=tmp_path)
    reference = {"completions": ["good", "bad", "bad"], "scores": [0.5, -0.2, 0.1]}
    policy = {"completions": ["great", "bad", "awful"], "scores": [0.9, -0.2, -0.6]}
    out = runner._held_out_pairs(None, None, exp, reference, policy)
    # p1: gold 0.9 > 0.5 and reward 2 > 1 (right); p2: gold tie (no pair); p3: gold 0.1 > -0.6 but 0 < 0.5 (wrong)
    assert (out["rm_pairs"], out["rm_pairs_right"]) == (2, 1)
    assert out["rm_score"] == pytest.approx((2.0 + 0.0 + 0.5) / 3)
    assert reference["rm_scores"] == [1.0, 0.0, 0.0]  # the reference is scored once and kept


def test_kl_coef_is_priced_in_gold_units_for_the_learned_reward(monkeypatch, tmp_path):
    """PPO on the learned reward gets kl_coef * reward_scale; PPO on the gold reward gets kl_coef as written."""
    import hfrlhf.trainers as trainers

    seen = {}

    class Stop(Exception):
        pass

    def fake_ppo(args, *a, **k):
        seen["kl_coef"] = args.kl_coef
        raise Stop

    monkeypatch.setattr(trainers, "PPOTrainer", fake_ppo)
    exp = _tiny_experiment(tmp_path)
    exp.reward_scale = 2.5
    for name, expected in (("ppo_rm", 2.5 * exp.methods["ppo_rm"].config["kl_coef"]),
                           ("rloo", 2.5 * exp.methods["rloo"].config["kl_coef"]),
                           ("ppo_gold", exp.methods["ppo_gold"].config["kl_coef"])):
        with pytest.raises(Stop):
            runner.train_policy(exp, name, exp.methods[name], reward_model=object())
        assert seen["kl_coef"] == pytest.approx(expected), name


def test_reward_scale_is_the_ratio_of_spreads():
    gold = [0.1, -0.4, 0.9, 0.3]
    learned = [3 * g + 7 for g in gold]  # any affine map with slope 3
    assert runner.reward_scale(learned, gold) == pytest.approx(3.0)
    assert runner.reward_scale([1.0, 2.0], [0.5, 0.5]) == 1.0  # no gold spread: left as written


def test_eval_at_evaluates_the_weights_of_earlier_steps(tmp_path, monkeypatch):
    """A development run evaluates its policy after given steps as well: the weights restored for step 2 of a
    3-step run evaluate as a 2-step run of the same seed does (constant learning rate), and the last step, the
    trained policy itself, is not evaluated twice."""
    def run(max_steps, eval_at, out):
        exp = _tiny_experiment(tmp_path / out)
        exp.methods = {"dpo": exp.methods["dpo"]}
        exp.methods["dpo"].config.update(max_steps=max_steps, learning_rate=5e-2)
        exp.eval_at = eval_at
        return runner.run(exp, log=lambda s: None)["methods"]["dpo"]

    evaluated = []
    evaluate = runner.evaluate_policy
    monkeypatch.setattr(runner, "evaluate_policy", lambda *a, **k: evaluated.append(1) or evaluate(*a, **k))
    m = run(3, (1, 2, 3), "three")
    assert len(evaluated) == 3  # the trained policy, then steps 1 and 2
    assert sorted(m["at_step"]) == [1, 2, 3]
    assert m["at_step"][3] == {k: m[k] for k in ("gold", "win_rate", "kl", "length")}
    two = run(2, (), "two")
    for key in ("gold", "kl", "length"):
        assert m["at_step"][2][key] == pytest.approx(two[key], abs=1e-5), key
    assert m["at_step"][1]["kl"] != pytest.approx(m["at_step"][2]["kl"], abs=1e-6)


def test_kl_budget_stops_each_policy_at_its_first_estimate_over_the_budget(tmp_path):
    """With a KL budget, a policy trains until its KL estimated on the unseen-topic development prompts reaches it
    (max_steps only caps the run); the estimates and the step it stopped at are in the results."""
    exp = _tiny_experiment(tmp_path)
    exp.methods = {"dpo": exp.methods["dpo"], "ppo_gold": exp.methods["ppo_gold"]}
    # (a setting whose estimates cross 0.5 a few steps in whatever the thread count: the tiny model's KL is noisy)
    exp.methods["dpo"].config.update(max_steps=12, learning_rate=2e-2)
    exp.methods["ppo_gold"].config.update(max_steps=3)
    exp.kl_budget, exp.kl_budget_every, exp.kl_budget_prompts = 0.5, 1, prompts.unseen_dev_prompts(4)
    methods = runner.run(exp, log=lambda s: None)["methods"]
    dpo = methods["dpo"]["kl_budget"]
    kls = [kl for _, kl in dpo["estimates"]]
    assert dpo["max_kl"] == 0.5 and dpo["stopped_at"] == dpo["steps"] < 12
    assert [step for step, _ in dpo["estimates"]] == list(range(4, dpo["steps"] + 1))  # from max_steps // 3 on
    assert kls[-1] >= 0.5 and all(k < 0.5 for k in kls[:-1])
    assert dpo["kept_step"] == (dpo["estimates"][-2][0] if len(kls) > 1 else 0)  # the last weights inside it
    ppo = methods["ppo_gold"]["kl_budget"]  # PPO's steps are rollouts; a 3-rollout cap: estimated at 1, 2, 3
    assert [step for step, _ in ppo["estimates"]][:1] == [1] and ppo["steps"] <= 3


def test_kl_budget_follows_each_methods_schedule(tmp_path, monkeypatch):
    """A method's own budget schedule (first estimate, interval, where every step is estimated) is used unless
    --kl_budget_every overrides it, and the last step of a run that stays under the budget is estimated too."""
    import hfrlhf.callbacks

    made = []

    class Recorded(hfrlhf.callbacks.KLBudgetCallback):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(hfrlhf.callbacks, "KLBudgetCallback", Recorded)
    exp = _tiny_experiment(tmp_path)
    exp.methods = {"dpo": dataclasses.replace(exp.methods["dpo"], budget_first=2, budget_every=3, budget_near=0.4,
                                                         budget_interpolate=1.5)}
    exp.methods["dpo"].config.update(max_steps=9)
    exp.kl_budget, exp.kl_budget_prompts = 1e3, prompts.unseen_dev_prompts(4)
    dpo = runner.run(exp, log=lambda s: None)["methods"]["dpo"]["kl_budget"]
    assert [step for step, _ in dpo["estimates"]] == [2, 5, 8, 9]
    assert [(cb.near_budget, cb.interpolate_past) for cb in made] == [(0.4, 1.5)]
    assert dpo["interpolation"] == [] and dpo["kept_lambda"] is None  # never over the budget: nothing to move
    assert {runner.METHODS[n].budget_near for n in ("ppo_gold", "ppo_rm", "rloo")} == {0.5}
    assert dpo["stopped_at"] is None and dpo["kept_step"] is None and dpo["steps"] == 9
    budgeted = runner.with_budget(runner.METHODS)
    for name, method in runner.METHODS.items():  # the budget settings replace the method's own, nothing else
        assert budgeted[name].config == {**method.config, **method.budget_config}, name
    assert all(runner.METHODS[n].budget_first and runner.METHODS[n].budget_every for n in runner.BUDGET)


def test_unseen_dev_prompts_share_nothing_with_training_or_held_out_topics():
    dev = prompts.unseen_dev_prompts()
    assert len(dev) == len(set(dev)) == 60
    for topic in prompts.TRAIN_TOPICS + prompts.HELD_OUT_TOPICS:
        assert not any(f" {topic}" in p for p in dev), topic


def test_eval_at_rejects_what_is_not_a_list_of_steps(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--methods", "dpo", "--eval_at", "24,late"])
    assert "--eval_at '24,late'" in capsys.readouterr().err


def test_kl_budget_default_is_the_full_runs_only():
    assert runner.resolve_kl_budget(None) == runner.KL_BUDGET
    assert runner.resolve_kl_budget(None, dev="validation") is None
    assert runner.resolve_kl_budget(None, dev="unseen") is None
    assert runner.resolve_kl_budget(None, reduced=True) is None
    assert runner.resolve_kl_budget(0) is None and runner.resolve_kl_budget(0.0, dev="unseen") is None
    assert runner.resolve_kl_budget(6.0) == 6.0 and runner.resolve_kl_budget(6.0, reduced=True) == 6.0


def test_experiment_doctests_pass():
    import doctest

    attempted = {}
    for module in (runner, make_data, ev, sampling, prompts, frontier, kl_by_position):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        assert result.failed == 0, module.__name__
        attempted[module] = result.attempted
    assert attempted[runner] >= 6


def test_a_negative_kl_budget_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        runner.main(["--methods", "dpo", "--kl_budget", "-2"])
    assert "--kl_budget -2.0" in capsys.readouterr().err


def test_a_reward_model_ensemble_is_trained_standardised_and_scored_as_one(tmp_path):
    from hfrlhf.models.reward_head import RewardEnsemble

    exp = _tiny_experiment(tmp_path)
    method = runner.apply_settings({"reward_model": exp.methods["reward_model"]},
                                   ["reward_model.members=2", "reward_model.combine=mean_minus_std",
                                    "reward_model.std_coef=0.5"])["reward_model"]
    model, metrics = runner.train_reward_model(exp, method)
    assert isinstance(model, RewardEnsemble) and len(model.members) == 2
    assert (model.combine, model.std_coef) == ("mean_minus_std", 0.5)
    assert (tmp_path / "out" / "reward_model").is_dir() and (tmp_path / "out" / "reward_model_member1").is_dir()
    assert len(metrics["member_accuracy"]) == 2 and metrics["members"] == 2
    # the members differ (their seeds order the data differently) and each is standardised on the validation texts
    assert not torch.equal(model.members[0].score.weight, model.members[1].score.weight)
    tok = exp.load_policy()[1]
    ps, texts, _, _ = runner.validation_texts(exp.data_dir)
    each = torch.tensor([runner.score_texts(m, tok, ps, texts) for m in model.members])
    torch.testing.assert_close(model.offset, each.mean(1), atol=1e-5, rtol=0)
    # the metrics computed from the members' scores are those of the ensemble scored afresh as one model
    again = runner.reward_model_accuracy(model, tok, exp.data_dir)
    assert again.pop("reward_scale") == pytest.approx(metrics["reward_scale"], rel=1e-5)
    assert {k: metrics[k] for k in again} == again
    assert (metrics["members"], metrics["combine"], metrics["std_coef"]) == (2, "mean_minus_std", 0.5)


def test_a_saved_reward_model_is_reloaded_only_for_the_same_recipe(tmp_path):
    """--reward_model_from: every member trained by one run is reloaded by the next (the same scores, so the same
    metrics), and a folder trained with another seed or settings, or without the saved members, is refused."""
    exp = _tiny_experiment(tmp_path)
    method = runner.apply_settings({"reward_model": exp.methods["reward_model"]},
                                   ["reward_model.members=2"])["reward_model"]
    trained, metrics = runner.train_reward_model(exp, method)
    again = runner.Experiment(**{**vars(exp), "output_dir": tmp_path / "again", "reward_model_from": tmp_path / "out"})
    loaded, metrics_loaded = runner.train_reward_model(again, method)
    assert not (tmp_path / "again").exists()  # nothing trained
    for a, b in zip(trained.members, loaded.members):
        torch.testing.assert_close(a.score.weight, b.score.weight, rtol=0, atol=0)
    tok = exp.load_policy()[1]
    ps, texts, _, _ = runner.validation_texts(exp.data_dir)
    torch.testing.assert_close(torch.tensor(runner.score_texts(loaded, tok, ps, texts)),
                               torch.tensor(runner.score_texts(trained, tok, ps, texts)), rtol=0, atol=1e-5)
    assert metrics_loaded["reward_scale"] == pytest.approx(metrics["reward_scale"], rel=1e-5)
    assert metrics_loaded["accuracy"] == metrics["accuracy"]
    other_seed = runner.Experiment(**{**vars(again), "seed": 1})
    with pytest.raises(ValueError, match=r"trained with other settings \(seed: "):
        runner.train_reward_model(other_seed, method)
    other_lr = runner.apply_settings({"reward_model": method}, ["reward_model.learning_rate=0.5"])["reward_model"]
    with pytest.raises(ValueError, match=r"other settings \(config: "):
        runner.train_reward_model(again, other_lr)
    nowhere = runner.Experiment(**{**vars(again), "reward_model_from": tmp_path / "missing"})
    with pytest.raises(ValueError, match="hfrlhf_reward_recipe.json not found"):
        runner.train_reward_model(nowhere, method)


def _run_result(gold_ref=0.25, **methods):
    return {"seed": 3, "eval_set": "held-out", "eval_prompts": 100, "eval_samples_per_prompt": 2,
            "generation": {"max_new_tokens": 40}, "reference": {"gold": gold_ref, "length": 30.0, "seconds": 40.0},
            "seconds": 600.0, "threads": 1, "load_average": {"start": 1.0, "end": 1.0},
            "methods": {n: {"label": n.upper(), "gold": g, "win_rate": 0.5, "kl": 5.0, "length": 30.0,
                            "train_seconds": 1.0, "eval_seconds": 1.0} for n, g in methods.items()}}


def test_keep_earlier_adds_only_missing_methods_of_the_same_reference_and_says_so():
    new, old = _run_result(ppo=0.6), {**_run_result(ppo=0.3, dpo=0.7), "seconds": 1800.0}
    out = runner.keep_earlier(new, old, "results_seed3.json")
    assert out["methods"]["ppo"]["gold"] == 0.6  # the rerun's own result wins
    assert out["methods"]["dpo"]["gold"] == 0.7 and out["methods"]["dpo"]["kept_from"] == "results_seed3.json"
    assert "kept_from" not in out["methods"]["ppo"] and "kept" not in new  # the inputs are left alone
    table = runner.results_table([out])
    assert "- Seed 3: DPO kept from an earlier run of the same code for them (results_seed3.json, 30.0 min" in table
    assert "- Seed 3, the rerun: 10.0 min" in table
    with pytest.raises(ValueError, match="its reference"):
        runner.keep_earlier(new, _run_result(gold_ref=0.3, dpo=0.7), "other.json")
    with pytest.raises(ValueError, match="eval_samples_per_prompt"):
        runner.keep_earlier(new, {**old, "eval_samples_per_prompt": 1}, "other.json")


def test_keep_from_of_another_seed_is_refused_before_anything_runs(tmp_path, capsys):
    path = tmp_path / "results_seed3.json"
    path.write_text(json.dumps(_run_result(dpo=0.7)))
    with pytest.raises(SystemExit):
        runner.main(["--methods", "dpo", "--seed", "4", "--keep_from", str(path)])
    assert "not a results file of seed 4" in capsys.readouterr().err


def test_a_rerun_writing_over_its_kept_file_reads_a_copy_the_table_ignores(tmp_path):
    target = tmp_path / "results_seed3.json"
    target.write_text(json.dumps(_run_result(dpo=0.7)))
    source = runner.protect_kept_file(target, target)
    assert source != target and json.loads(source.read_text()) == json.loads(target.read_text())
    target.write_text("{}")  # the rerun's first write: the earlier methods survive in the copy
    assert json.loads(source.read_text())["methods"]["dpo"]["gold"] == 0.7
    assert runner.results_files(tmp_path) == [target]
    other = tmp_path / "elsewhere.json"
    assert runner.protect_kept_file(other, target) == other  # another file is read as it is


def test_frontier_estimates_match_closed_forms():
    scores = [0.9, -0.2, 0.4, 0.4, 0.1]
    ordered = sorted(scores)
    for n in range(1, 6):  # the i-th smallest is the best of an n-subset in C(i - 1, n - 1) of the C(5, n) subsets
        expected = sum(s * math.comb(i, n - 1) for i, s in enumerate(ordered)) / math.comb(5, n)
        assert frontier.best_of_n(scores, n) == pytest.approx(expected)
    assert frontier.best_of_n(scores, 1) == pytest.approx(sum(scores) / 5)
    for beta in (2.0, 0.3, 0.05):  # KL of the tilt = E_p[r] / beta - log mean exp(r / beta)
        reward, kl = frontier.tilt(scores, beta)
        log_mean = math.log(sum(math.exp(s / beta) for s in scores) / 5)
        assert kl == pytest.approx(reward / beta - log_mean, rel=1e-9, abs=1e-12)
        assert reward == pytest.approx(sum(s * math.exp(s / beta) for s in scores) / sum(math.exp(s / beta) for s in scores))
    rows = frontier.frontier([[0.0, 1.0, 0.5, 0.5], [0.2, 0.2, -0.4, 0.8]])
    assert [r["setting"] for r in rows[:3]] == ["n = 2", "n = 3", "n = 4"]
    assert rows[2]["gain"] == pytest.approx((1.0 + 0.8) / 2 - 2.8 / 8)  # best of all 4 against the mean
