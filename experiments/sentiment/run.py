"""The controlled-sentiment experiment, end to end with the library: reward model, RL and direct methods,
held-out evaluation by the gold reward, results JSON, reward-against-KL plot and the table of docs/alignment.md.

    python experiments/sentiment/run.py --seed 0              # every method (see METHODS)
    python experiments/sentiment/run.py --reduced --seed 0    # DPO only, the README's quick check (minutes)
    python experiments/sentiment/run.py --methods reward_model,ppo_rm --seed 1

The data come from ``make_data.py`` (shipped in ``data/``). The policy of every method is the bundled
SmolLM2-135M-Instruct with a fresh LoRA adapter; the reference is the same model with the adapter off. Every
method's configuration lives in :data:`METHODS`; nothing here reads the held-out prompts except ``gold_eval``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_eval import evaluate_policy, reference_samples  # noqa: E402
from make_data import DATA_DIR, read_jsonl  # noqa: E402
from prompts import held_out_prompts  # noqa: E402
from sampling import GenerationSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


@dataclass
class Method:
    """One trained policy (or the reward model): which trainer, on which data, with which settings."""

    trainer: str  # "reward", "dpo", "kto" or "ppo"
    data: str  # "pairwise", "listwise", "unpaired" or "prompts"
    config: dict[str, Any] = field(default_factory=dict)
    reward: str | None = None  # PPO: "model" (the learned reward model) or "gold" (VADER)
    label: str = ""


COMMON: dict[str, Any] = {"lr_scheduler_type": "constant", "logging_steps": 5, "save_strategy": "no",
                          "report_to": [], "disable_tqdm": True, "max_length": 128}
PPO_COMMON: dict[str, Any] = {"learning_rate": 1e-4, "response_length": 40, "temperature": 0.7, "kl_coef": 0.05,
                              "per_device_train_batch_size": 8, "num_ppo_epochs": 2, "num_mini_batches": 2,
                              "max_steps": 16, "lam": 1.0, "num_sample_generations": 0}
# lam = 1: with a critic that starts at zero, lam < 1 gives the early tokens of every response almost none of the
# final score, and whitening over tokens then makes their advantages negative whatever the response was worth
# (docs/alignment.md); lam = 1 gives every token the score minus the critic's baseline from the first rollout.
DIRECT: dict[str, Any] = {"learning_rate": 5e-5, "per_device_train_batch_size": 8, "num_train_epochs": 1}

METHODS: dict[str, Method] = {
    "reward_model": Method("reward", "pairwise", {"learning_rate": 1e-4, "per_device_train_batch_size": 8,
                                                   "num_train_epochs": 1}, label="reward model"),
    "dpo": Method("dpo", "pairwise", {**DIRECT, "beta": 0.1, "loss_type": "sigmoid"}, label="DPO"),
    "ppo_gold": Method("ppo", "prompts", {**PPO_COMMON, "advantage_estimator": "gae"}, reward="gold",
                       label="PPO, gold reward"),
    "ppo_rm": Method("ppo", "prompts", {**PPO_COMMON, "advantage_estimator": "gae"}, reward="model",
                     label="PPO, learned reward"),
    "rloo": Method("ppo", "prompts", {**PPO_COMMON, "advantage_estimator": "rloo", "num_generations": 2,
                                      "per_device_train_batch_size": 4}, reward="model", label="RLOO, learned reward"),
    "ipo": Method("dpo", "pairwise", {**DIRECT, "beta": 0.1, "loss_type": "ipo"}, label="IPO"),
    "kto": Method("kto", "unpaired", {**DIRECT, "beta": 0.1, "per_device_train_batch_size": 16}, label="KTO"),
    "lipo": Method("dpo", "listwise", {**DIRECT, "beta": 0.1, "loss_type": "lipo",
                                       "per_device_train_batch_size": 4}, label="LiPO (listwise)"),
}
REDUCED: dict[str, Method] = {
    "dpo": Method("dpo", "pairwise", {**DIRECT, "beta": 0.1, "loss_type": "sigmoid", "max_steps": 20}, label="DPO"),
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}


@dataclass
class Experiment:
    """Everything one run needs; ``load_policy``/``load_reward`` are swapped for tiny models in tests."""

    seed: int = 0
    methods: dict[str, Method] = field(default_factory=lambda: dict(METHODS))
    data_dir: Path = DATA_DIR
    output_dir: Path = ROOT / "outputs" / "sentiment"
    eval_prompts: list[str] = field(default_factory=held_out_prompts)
    eval_samples: int = 1  # completions per held-out prompt
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    load_policy: Callable[[], tuple[Any, Any]] | None = None
    load_reward: Callable[[], Any] | None = None
    max_train_rows: int | None = None


def _bundled_policy() -> tuple[Any, Any]:
    from hfrlhf.models.loading import load_bundled

    return load_bundled()


def _bundled_reward() -> Any:
    from hfrlhf.models.loading import load_bundled

    return load_bundled(reward=True)[0]


def _records(exp: Experiment, kind: str) -> list[dict[str, Any]]:
    if kind == "prompts":
        rows = [{"prompt": r["prompt"]} for r in read_jsonl(exp.data_dir / "pairwise.jsonl")]
    else:
        rows = read_jsonl(exp.data_dir / f"{kind}.jsonl")
    return rows[:exp.max_train_rows] if exp.max_train_rows else rows


def _lora(task_type: str) -> Any:
    from peft import LoraConfig

    extra = {"modules_to_save": ["score"]} if task_type == "SEQ_CLS" else {}
    return LoraConfig(task_type=task_type, bias="none", **LORA, **extra)


def train_reward_model(exp: Experiment, method: Method) -> tuple[Any, dict[str, float]]:
    """Stage 2: a LoRA reward model on the pairwise data; accuracy on the validation prompts' pairs."""
    from hfrlhf.trainers import RewardConfig, RewardTrainer

    _, tokenizer = (exp.load_policy or _bundled_policy)()
    model = (exp.load_reward or _bundled_reward)()
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(exp.output_dir / "reward_model"), seed=exp.seed, **{**COMMON, **method.config})
    trainer = RewardTrainer(model, args=args, train_dataset=_records(exp, "pairwise"),
                            eval_dataset=read_jsonl(exp.data_dir / "rm_eval_pairwise.jsonl"),
                            processing_class=tokenizer, peft_config=_lora("SEQ_CLS"))
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    reward_model = trainer.model.merge_and_unload().eval()
    return reward_model, {"accuracy_before": before["eval_accuracy"], "accuracy": after["eval_accuracy"]}


def train_policy(exp: Experiment, name: str, method: Method, reward_model: Any = None) -> Any:
    """Stage 3: one policy (a peft model whose adapter off is the reference)."""
    from hfrlhf.trainers import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer, PPOConfig, PPOTrainer
    from hfrlhf.workflows.rewards import vader_sentiment

    model, tokenizer = (exp.load_policy or _bundled_policy)()
    settings = {**COMMON, **method.config, "output_dir": str(exp.output_dir / name), "seed": exp.seed}
    data = _records(exp, method.data)
    if method.trainer == "dpo":
        trainer = DPOTrainer(model, args=DPOConfig(**settings), train_dataset=data, processing_class=tokenizer,
                             peft_config=_lora("CAUSAL_LM"))
    elif method.trainer == "kto":
        # weight the minority class up so desirable : undesirable mass is 1 (the KTO paper's range is [1, 4/3])
        n_good = sum(bool(r["label"]) for r in data)
        n_bad = len(data) - n_good
        if n_good and n_bad and "desirable_weight" not in settings:
            if n_good < n_bad:
                settings["desirable_weight"] = n_bad / n_good
            else:
                settings["undesirable_weight"] = n_good / n_bad
        trainer = KTOTrainer(model, args=KTOConfig(**settings), train_dataset=data, processing_class=tokenizer,
                             peft_config=_lora("CAUSAL_LM"))
    elif method.trainer == "ppo":
        reward = vader_sentiment if method.reward == "gold" else reward_model
        if reward is None:
            raise ValueError(f"{name} needs the reward model: run the reward_model stage first")
        settings.pop("max_length")
        trainer = PPOTrainer(PPOConfig(**settings), tokenizer, model, reward_model=reward, train_dataset=data,
                             peft_config=_lora("CAUSAL_LM"))
    else:
        raise ValueError(f"unknown trainer {method.trainer!r}")
    trainer.train()
    trainer.save_model()  # the LoRA adapter (safetensors), its config and the tokenizer, in settings["output_dir"]
    policy = trainer.model.policy if method.trainer == "ppo" else trainer.model
    logs = [h for h in trainer.state.log_history if "loss" in h or "objective/scores" in h]
    return policy, tokenizer, logs


def run(exp: Experiment, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every method in ``exp.methods`` and evaluate it; returns (and writes) the results."""
    import torch

    from hfrlhf.models.loading import bf16_supported

    exp.output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(exp.seed)
    results: dict[str, Any] = {"seed": exp.seed, "eval_prompts": len(exp.eval_prompts),
                               "eval_samples_per_prompt": exp.eval_samples, "generation": exp.generation.to_dict(),
                               "bf16": bf16_supported(), "threads": torch.get_num_threads(), "methods": {}}
    started = time.time()
    # 1. the reference on the held-out prompts (the base model, no adapter)
    base, tokenizer = (exp.load_policy or _bundled_policy)()
    t = time.time()
    reference = reference_samples(base, tokenizer, exp.eval_prompts, exp.generation, n=exp.eval_samples, seed=exp.seed)
    results["reference"] = {"gold": reference["gold"], "length": reference["length"], "seconds": time.time() - t}
    log(f"[reference] gold {reference['gold']:.3f}, length {reference['length']:.1f} ({time.time() - t:.0f} s)")
    del base
    # 2. the reward model, when a method needs it
    reward_model = None
    needs_rm = any(m.trainer == "ppo" and m.reward == "model" for m in exp.methods.values())
    for name, method in exp.methods.items():
        t = time.time()
        if method.trainer == "reward":
            reward_model, metrics = train_reward_model(exp, method)
            results["reward_model"] = {**metrics, "seconds": time.time() - t, "config": method.config}
            _write(exp, results, started)
            log(f"[reward_model] held-out pair accuracy {metrics['accuracy_before']:.3f} -> {metrics['accuracy']:.3f} "
                f"({time.time() - t:.0f} s)")
            continue
        if method.trainer == "ppo" and method.reward == "model" and reward_model is None and needs_rm:
            raise ValueError(f"{name} uses the learned reward model: list reward_model before it")
        policy, tok, logs = train_policy(exp, name, method, reward_model)
        train_seconds = time.time() - t
        metrics = evaluate_policy(policy, tok, exp.eval_prompts, exp.generation, reference, n=exp.eval_samples,
                                  seed=exp.seed)
        metrics.update(label=method.label or name, train_seconds=train_seconds,
                       eval_seconds=time.time() - t - train_seconds, config=method.config, reward=method.reward,
                       train_log=logs[-3:])
        results["methods"][name] = metrics
        _write(exp, results, started)
        log(f"[{name}] gold {metrics['gold']:.3f} (reference {reference['gold']:.3f}), win {metrics['win_rate']:.2f}, "
            f"KL {metrics['kl']:.2f}, length {metrics['length']:.1f}, train {train_seconds:.0f} s, "
            f"eval {metrics['eval_seconds']:.0f} s")
        log(f"[{name}] adapter saved in {exp.output_dir / name}")
        del policy
    _write(exp, results, started)
    return results


def _write(exp: Experiment, results: dict[str, Any], started: float) -> None:
    """Results so far (written after every method, so a long run that stops keeps what it finished)."""
    results["seconds"] = time.time() - started
    with open(exp.output_dir / f"results_seed{exp.seed}.json", "w") as f:
        json.dump(results, f, indent=2)


# --- reporting -----------------------------------------------------------------------------------------------------
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"


def results_table(all_results: Sequence[dict[str, Any]]) -> str:
    """A markdown table of every method of every seed: gold reward, gain over the reference, win rate, KL, length."""
    lines = ["| seed | method | gold reward | gain vs reference | win rate | KL (nats) | length (tokens) | train time |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for res in all_results:
        ref = res["reference"]
        lines.append(f"| {res['seed']} | reference | {ref['gold']:.3f} | 0 | 0.50 | 0 | {ref['length']:.1f} | |")
        if "reward_model" in res:
            rm = res["reward_model"]
            lines.append(f"| {res['seed']} | reward model (pair accuracy {rm['accuracy']:.3f}) | | | | | | "
                         f"{rm['seconds']:.0f} s |")
        for m in res["methods"].values():
            lines.append(f"| {res['seed']} | {m['label']} | {m['gold']:.3f} | {m['gold'] - ref['gold']:+.3f} | "
                         f"{m['win_rate']:.2f} | {m['kl']:.2f} | {m['length']:.1f} | {m['train_seconds']:.0f} s |")
    return "\n".join(lines)


def plot(all_results: Sequence[dict[str, Any]], path: Path) -> None:
    """Gold reward against KL(policy || reference), one point per method and seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in all_results:
        ax.axhline(res["reference"]["gold"], color="grey", linestyle="--", linewidth=0.8)
        for m in res["methods"].values():
            ax.scatter(m["kl"], m["gold"], label=f"{m['label']} (seed {res['seed']})")
    ax.set_xlabel("KL(policy || reference), nats per completion")
    ax.set_ylabel("held-out gold reward (VADER)")
    ax.set_title("Controlled sentiment: reward against KL (dashed: reference)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_docs(all_results: Sequence[dict[str, Any]], doc: Path, plot_path: Path) -> None:
    """Rewrite the table between the markers of ``doc`` and the plot."""
    plot(all_results, plot_path)
    text = doc.read_text() if doc.exists() else f"{TABLE_START}\n{TABLE_END}\n"
    head, _, rest = text.partition(TABLE_START)
    _, _, tail = rest.partition(TABLE_END)
    doc.write_text(f"{head}{TABLE_START}\n{results_table(all_results)}\n{TABLE_END}{tail}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reduced", action="store_true", help="DPO only, one sample per held-out prompt")
    parser.add_argument("--methods", default=None, help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--output_dir", type=Path, default=ROOT / "outputs" / "sentiment")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--eval_samples", type=int, default=1, help="completions per held-out prompt")
    parser.add_argument("--docs_only", action="store_true", help="no training: only --update_docs")
    parser.add_argument("--update_docs", action="store_true", help="rewrite docs/alignment.md's table and plot "
                        "from every results_seed*.json in output_dir")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.docs_only:
        all_results = [json.loads(p.read_text()) for p in sorted(args.output_dir.glob("results_seed*.json"))]
        update_docs(all_results, DOCS / "alignment.md", DOCS / "alignment_reward_kl.png")
        return
    if args.reduced:
        exp = Experiment(seed=args.seed, methods=dict(REDUCED), eval_samples=1, output_dir=args.output_dir / "reduced")
    else:
        methods = dict(METHODS)
        if args.methods:
            names = args.methods.split(",")
            unknown = sorted(set(names) - set(METHODS))
            if unknown:
                parser.error(f"unknown methods {unknown}")
            methods = {n: METHODS[n] for n in names}
        exp = Experiment(seed=args.seed, methods=methods, output_dir=args.output_dir, eval_samples=args.eval_samples)
    results = run(exp)
    print(results_table([results]))
    if args.update_docs:
        all_results = [json.loads(p.read_text()) for p in sorted(args.output_dir.glob("results_seed*.json"))]
        update_docs(all_results, DOCS / "alignment.md", DOCS / "alignment_reward_kl.png")


if __name__ == "__main__":
    main()
