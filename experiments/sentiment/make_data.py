"""Build the experiment's preference data with the library: sample K completions per training prompt from the
reference (the bundled SmolLM2-135M-Instruct), score them with the gold reward (VADER compound), and write

- ``data/samples.jsonl``   every prompt with its K completions and gold scores (the raw material);
- ``data/pairwise.jsonl``  best vs worst completion of each prompt (``prompt``, ``chosen``, ``rejected``, ``margin``);
- ``data/listwise.jsonl``  all K completions with their scores (``prompt``, ``responses``, ``scores``);
- ``data/unpaired.jsonl``  every completion with ``label = score >= threshold`` (``prompt``, ``completion``, ``label``);
- ``data/rm_eval_pairwise.jsonl``  the same best-vs-worst pairs for the reward model's validation prompts
  (training prompts kept out of every training file; the held-out evaluation prompts are never sampled here);
- ``data/meta.json``       seed, generation settings, K, threshold, counts and the gold reward's statistics.

Regenerate (about 10 minutes on 2 idle cores):

    python experiments/sentiment/make_data.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prompts import as_messages, train_prompts  # noqa: E402
from sampling import GenerationSettings, sample  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
K = 4
THRESHOLD = 0.5  # a completion is "desirable" for KTO when its gold score reaches this
NUM_TRAIN_PROMPTS = 300
NUM_RM_EVAL_PROMPTS = 60


def _turn(prompt: Any, completion: str) -> Any:
    """A completion in the prompt's form: text for a text prompt, one assistant message for a chat prompt."""
    return completion if isinstance(prompt, str) else [{"role": "assistant", "content": completion}]


def pairwise_record(prompt: Any, completions: Sequence[str], scores: Sequence[float]) -> dict[str, Any] | None:
    """Best vs worst completion by gold score; None when every completion scores the same (no preference).

    Ties go to the earliest completion, so the record does not depend on sorting details.

    >>> pairwise_record("p", ["a", "b", "c"], [0.1, 0.9, -0.3])
    {'prompt': 'p', 'chosen': 'b', 'rejected': 'c', 'margin': 1.2}
    >>> pairwise_record("p", ["a", "b"], [0.5, 0.5]) is None
    True
    """
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    worst = min(range(len(scores)), key=lambda i: (scores[i], i))
    if scores[best] <= scores[worst]:
        return None
    return {"prompt": prompt, "chosen": _turn(prompt, completions[best]), "rejected": _turn(prompt, completions[worst]),
            "margin": round(float(scores[best]) - float(scores[worst]), 6)}


def listwise_record(prompt: Any, completions: Sequence[str], scores: Sequence[float]) -> dict[str, Any] | None:
    """All completions with their gold scores; None when they all tie (a listwise loss has nothing to rank)."""
    if max(scores) == min(scores):
        return None
    return {"prompt": prompt, "responses": [_turn(prompt, c) for c in completions],
            "scores": [float(s) for s in scores]}


def unpaired_records(prompt: Any, completions: Sequence[str], scores: Sequence[float],
                     threshold: float = THRESHOLD) -> list[dict[str, Any]]:
    """One record per completion, ``label = score >= threshold``.

    >>> [r["label"] for r in unpaired_records("p", ["a", "b"], [0.5, 0.49], threshold=0.5)]
    [True, False]
    """
    return [{"prompt": prompt, "completion": _turn(prompt, c), "label": bool(s >= threshold)}
            for c, s in zip(completions, scores)]


def build_datasets(groups: Sequence[tuple[Any, Sequence[str], Sequence[float]]],
                   threshold: float = THRESHOLD) -> dict[str, list[dict[str, Any]]]:
    """``groups`` of ``(prompt, completions, scores)`` -> ``{"pairwise", "listwise", "unpaired"}`` record lists."""
    out: dict[str, list[dict[str, Any]]] = {"pairwise": [], "listwise": [], "unpaired": []}
    for prompt, completions, scores in groups:
        for name, record in (("pairwise", pairwise_record(prompt, completions, scores)),
                             ("listwise", listwise_record(prompt, completions, scores))):
            if record is not None:
                out[name].append(record)
        out["unpaired"] += unpaired_records(prompt, completions, scores, threshold)
    return out


def write_jsonl(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_train_prompts", type=int, default=NUM_TRAIN_PROMPTS)
    parser.add_argument("--num_rm_eval_prompts", type=int, default=NUM_RM_EVAL_PROMPTS)
    parser.add_argument("--max_new_tokens", type=int, default=GenerationSettings.max_new_tokens)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=DATA_DIR)
    parser.add_argument("--rebuild", action="store_true",
                        help="no sampling: rebuild the datasets from an existing samples.jsonl in --out")
    args = parser.parse_args(argv)
    if args.rebuild:
        rows = read_jsonl(args.out / "samples.jsonl")
        with open(args.out / "meta.json") as f:
            meta = json.load(f)
        groups = [(r["prompt"], r["completions"], r["scores"]) for r in rows]
        write_outputs(args.out, groups, meta["train_prompts"], meta)
        print(json.dumps(meta, indent=2))
        return

    import torch

    from hfrlhf.models.loading import load_bundled
    from hfrlhf.workflows.rewards import vader_sentiment

    if args.threads:
        torch.set_num_threads(args.threads)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    prompts = train_prompts(args.num_train_prompts + args.num_rm_eval_prompts, seed=args.seed)
    model, tokenizer = load_bundled()
    started = time.time()
    groups = []
    chunk = settings.batch_size // K
    for start in range(0, len(prompts), chunk):
        part = prompts[start:start + chunk]
        s = sample(model, tokenizer, part, settings, n=K, seed=args.seed * 100003 + start)
        scores = vader_sentiment(part, s.completions)
        for i, p in enumerate(part):
            groups.append((p, s.completions[i * K:(i + 1) * K], [round(x, 4) for x in scores[i * K:(i + 1) * K]]))
        print(f"[make_data] {len(groups)}/{len(prompts)} prompts, {time.time() - started:.0f} s", flush=True)
    meta = {"model": "smollm2-135m-instruct (the reference)", "seed": args.seed, "k": K, "threshold": THRESHOLD,
            "generation": settings.to_dict(), "gold_reward": "VADER compound of the completion",
            "seconds": round(time.time() - started, 1)}
    write_outputs(args.out, groups, args.num_train_prompts, meta)
    print(json.dumps(meta, indent=2))


def write_outputs(out: Path, groups: Sequence[tuple[str, Sequence[str], Sequence[float]]], num_train: int,
                  meta: dict[str, Any]) -> None:
    """Write samples, the three training datasets, the reward model's validation pairs and ``meta.json``
    (updated in place with the counts and the gold reward's statistics)."""
    train_groups, rm_eval_groups = groups[:num_train], groups[num_train:]
    train = build_datasets([(as_messages(p), c, s) for p, c, s in train_groups], meta["threshold"])
    rm_eval = build_datasets([(as_messages(p), c, s) for p, c, s in rm_eval_groups], meta["threshold"])
    write_jsonl(out / "samples.jsonl",
                [{"prompt": p, "split": "train" if i < num_train else "rm_eval", "completions": list(c),
                  "scores": list(s)} for i, (p, c, s) in enumerate(groups)])
    for name, records in train.items():
        write_jsonl(out / f"{name}.jsonl", records)
    write_jsonl(out / "rm_eval_pairwise.jsonl", rm_eval["pairwise"])
    all_scores = [x for _, _, s in train_groups for x in s]
    meta.update({
        "train_prompts": len(train_groups), "rm_eval_prompts": len(rm_eval_groups),
        "counts": {**{n: len(r) for n, r in train.items()}, "rm_eval_pairwise": len(rm_eval["pairwise"])},
        "gold_mean": round(sum(all_scores) / len(all_scores), 4),
        "desirable_fraction": round(sum(x >= meta["threshold"] for x in all_scores) / len(all_scores), 4),
    })
    with open(out / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)


if __name__ == "__main__":
    main()
