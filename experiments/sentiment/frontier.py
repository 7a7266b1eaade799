"""How much gold reward a policy *could* gain per nat: the reward-against-KL of best-of-n and of the exponentially
tilted reference, computed from the reference's own scored samples (no training, no held-out prompt).

    python experiments/sentiment/frontier.py                # the shipped data/samples.jsonl, both splits
    python experiments/sentiment/frontier.py --sample 8     # 8 fresh samples of each unseen-topic development prompt

The KL-regularised optimum of the gold reward, ``pi*(y) ~ ref(y) exp(r(y) / beta)``, is the policy with the most
reward at its KL; no trained policy beats it. Two estimates of it from the K scored reference completions of each
prompt in ``samples.jsonl``:

- **best-of-n**: the expected gold score of the best of n reference samples (the unbiased average over the n-subsets
  of the K samples), at the KL bound ``log n - (n - 1) / n`` (Stiennon et al., 2020; Beirami et al., 2024 show it
  bounds the KL from above);
- **tilt**: the reference restricted to its K samples, each weighted ``exp(score / beta)``: reward and KL of that
  reweighting (plug-in estimates; with K samples the gain stops at the best of K).

Both read the gain against the mean score of the same samples. The training and validation splits of the data are
reported apart. ``--sample K`` samples K reference completions of each unseen-topic development prompt instead
(the evaluation's sampling settings, ``--seed``), the prompts the trained policies' development curves are measured
on. The held-out prompts are never read.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_data import DATA_DIR, read_jsonl  # noqa: E402


def best_of_n(scores: Sequence[float], n: int) -> float:
    """Expected best of ``n`` draws, estimated without bias from the scored samples ``scores`` (the mean of the
    maximum over every ``n``-subset).

    >>> best_of_n([0.0, 1.0, 0.5], 2)  # subsets {0, 1}, {0, .5}, {1, .5}: maxima 1, .5, 1
    0.8333333333333334
    """
    subsets = list(itertools.combinations(scores, n))
    return sum(max(s) for s in subsets) / len(subsets)


def best_of_n_kl(n: int) -> float:
    """The KL bound of best-of-n, ``log n - (n - 1) / n`` nats.

    >>> round(best_of_n_kl(4), 4)
    0.6363
    """
    return math.log(n) - (n - 1) / n


def tilt(scores: Sequence[float], beta: float) -> tuple[float, float]:
    """Mean score and KL (nats) of the uniform distribution over ``scores`` reweighted by ``exp(score / beta)``.

    >>> r, kl = tilt([0.0, 1.0], 1.0)  # weights 1 and e: p = (1, e) / (1 + e)
    >>> round(r, 4), round(kl, 4)
    (0.7311, 0.1109)
    """
    top = max(scores)
    w = [math.exp((s - top) / beta) for s in scores]
    z = sum(w)
    p = [x / z for x in w]
    k = len(scores)
    return sum(pi * s for pi, s in zip(p, scores)), sum(pi * math.log(k * pi) for pi in p if pi > 0)


def frontier(groups: Sequence[Sequence[float]], betas: Sequence[float] = (0.5, 0.2, 0.1, 0.05)) -> list[dict]:
    """Rows of (kind, setting, gain, kl) over ``groups`` (the K scores of each prompt), gains against the mean."""
    mean = statistics.fmean(s for g in groups for s in g)
    k = min(len(g) for g in groups)
    rows = [{"kind": "best-of-n", "setting": f"n = {n}", "gain": statistics.fmean(best_of_n(g, n) for g in groups) - mean,
             "kl": best_of_n_kl(n)} for n in range(2, k + 1)]
    for beta in betas:
        r, kl = zip(*(tilt(g, beta) for g in groups))
        rows.append({"kind": "tilt", "setting": f"beta = {beta}", "gain": statistics.fmean(r) - mean,
                     "kl": statistics.fmean(kl)})
    return rows


def sampled_records(k: int, seed: int, threads: int) -> list[dict]:
    """K reference completions of each unseen-topic development prompt, scored by the gold reward, as records of
    ``samples.jsonl`` (split ``dev-unseen``)."""
    import torch
    from prompts import unseen_dev_prompts
    from sampling import GenerationSettings, sample

    from hfrlhf.models.loading import load_bundled
    from hfrlhf.workflows.rewards import vader_sentiment

    torch.set_num_threads(threads)
    model, tokenizer = load_bundled()
    prompts = unseen_dev_prompts()
    samples = sample(model, tokenizer, prompts, GenerationSettings(), n=k, seed=seed)
    scores = vader_sentiment(samples.prompts, samples.completions)
    return [{"prompt": p, "split": "dev-unseen", "scores": scores[i * k:(i + 1) * k]} for i, p in enumerate(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_DIR / "samples.jsonl")
    parser.add_argument("--sample", type=int, default=0, metavar="K",
                        help="sample K reference completions per unseen-topic development prompt instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    records = sampled_records(args.sample, args.seed, args.threads) if args.sample else read_jsonl(args.data)
    for split in sorted({r["split"] for r in records}, reverse=True):
        groups = [r["scores"] for r in records if r["split"] == split]
        mean = statistics.fmean(s for g in groups for s in g)
        print(f"\n{split}: {len(groups)} prompts, {len(groups[0])} samples each, mean gold {mean:.3f}\n")
        print("| estimate | setting | gain | KL (nats) |\n|---|---|---:|---:|")
        for row in frontier(groups):
            print(f"| {row['kind']} | {row['setting']} | {row['gain']:+.3f} | {row['kl']:.2f} |")


if __name__ == "__main__":
    main()
