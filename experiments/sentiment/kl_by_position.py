"""Where in its answers a trained policy spends its KL: KL(policy || reference) split by token position.

    python experiments/sentiment/kl_by_position.py outputs/sentiment/dev_unseen/dpo --samples 2 --seed 0

Loads the LoRA adapter in the folder onto the bundled model, samples ``--samples`` answers to each unseen-topic
development prompt with the evaluation's settings (never the held-out prompts), and sums
``log pi(y_t) - log ref(y_t)`` (both at the sampling temperature, teacher-forced) by the position ``t`` of the token
in its answer. Prints the KL per sample (the evaluation's estimate, split) and, for ranges of positions, their share
of it and the mean per token.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from prompts import unseen_dev_prompts  # noqa: E402
from sampling import GenerationSettings, sample, scoring_batches  # noqa: E402

RANGES = ((0, 1), (1, 3), (3, 5), (5, 10), (10, 20), (20, 30), (30, 10_000))


def by_position(token_kl: torch.Tensor, positions: torch.Tensor, num_samples: int,
                ranges: Sequence[tuple[int, int]] = RANGES) -> list[dict[str, float]]:
    """Per range ``[a, b)`` of positions: its KL per sample, its share of the whole, and the mean per token there.

    >>> rows = by_position(torch.tensor([2.0, 1.0, 1.0, 0.0]), torch.tensor([0, 1, 0, 1]), 2, ((0, 1), (1, 5)))
    >>> [(r["kl"], r["share"], r["per_token"]) for r in rows]
    [(1.5, 0.75, 1.5), (0.5, 0.25, 0.5)]
    """
    total = float(token_kl.sum())
    rows = []
    for a, b in ranges:
        inside = (positions >= a) & (positions < b)
        if not inside.any():
            continue
        part = float(token_kl[inside].sum())
        rows.append({"from": a, "to": b, "kl": part / num_samples, "share": part / total if total else float("nan"),
                     "per_token": part / int(inside.sum())})
    return rows


@torch.no_grad()
def token_kls(policy: torch.nn.Module, tokenizer, prompts: Sequence[str], samples: int, seed: int
              ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-token ``log pi - log ref`` of ``samples`` sampled answers per prompt, their positions, and the count."""
    from hfrlhf.ops.logprobs import batch_logprobs
    from hfrlhf.ops.rollout import reference_logps

    settings = GenerationSettings()
    s = sample(policy, tokenizer, prompts, settings, n=samples, seed=seed)
    kls = []
    for seq in scoring_batches(tokenizer, s, settings.batch_size):
        kls.append(batch_logprobs(policy, seq, temperature=settings.temperature).token_logps
                   - reference_logps(policy, seq, None, temperature=settings.temperature))
    positions = torch.cat([torch.arange(len(t)) for t in s.token_ids])  # the scored tokens' order
    return torch.cat(kls).double(), positions, len(s.token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", type=Path, help="a folder with a saved LoRA adapter of the bundled model")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    from peft import PeftModel

    from hfrlhf.models.loading import load_bundled

    torch.set_num_threads(args.threads)
    model, tokenizer = load_bundled()
    policy = PeftModel.from_pretrained(model, str(args.adapter)).eval()
    token_kl, positions, n = token_kls(policy, tokenizer, unseen_dev_prompts(), args.samples, args.seed)
    print(f"{args.adapter}: KL {float(token_kl.sum()) / n:.2f} nats per sample ({n} samples)\n")
    print("| tokens | KL per sample | share | per token |\n|---|---:|---:|---:|")
    for row in by_position(token_kl, positions, n):
        last = "end" if row["to"] >= RANGES[-1][1] else row["to"] - 1
        print(f"| {row['from']}-{last} | {row['kl']:.2f} | {row['share']:.3f} | {row['per_token']:.3f} |")


if __name__ == "__main__":
    main()
