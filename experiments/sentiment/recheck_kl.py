"""Re-estimate the KL of trained policies on the development prompts, with fresh samples, the way the evaluation
estimates it (float32, ``--samples`` completions per prompt), to compare with the KL-budget estimate that kept them.

    python experiments/sentiment/recheck_kl.py outputs/sentiment_round5 --run_seed 0 --samples 2 --seed 1000

For every method of ``results_seed<run_seed>.json`` in the folder trained with ``--kl_budget``, loads its adapter
(``run.py`` saves each method's adapter in ``<folder>/<method>``, so they are those of the last run written there:
give that run's seed), samples
on the 60 unseen-topic development prompts (the budget's prompts; never the held-out ones) with a seed the budget
did not use, and prints the budget's estimate at the kept step, this re-estimate and their ratio. The ratio tells
how much of the gap between the budget and the held-out KL comes from choosing the last estimate under the budget
(an estimate that came out low is more likely to be kept) rather than from the prompts; it is measured on
development prompts only, so a budget chosen from it is not tuned to the evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gold_eval import kl_on_samples  # noqa: E402
from prompts import unseen_dev_prompts  # noqa: E402
from sampling import GenerationSettings, sample, sequence_logps  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--run_seed", type=int, required=True, help="the seed of the run whose adapters the folder holds")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--methods", default="", help="comma-separated subset (default: every budgeted method)")
    args = parser.parse_args()
    import torch
    from peft import PeftModel

    from hfrlhf.models.loading import load_bundled

    torch.set_num_threads(args.threads)
    prompts = unseen_dev_prompts()
    settings = GenerationSettings()
    out = {}
    files = [args.folder / f"results_seed{args.run_seed}.json"]
    if not files[0].exists():  # the run is still going: its workers' files
        files = sorted(args.folder.glob(f"results_seed{args.run_seed}.worker*.json"))
    for results_file in files:
        results = json.loads(results_file.read_text())
        for name, metrics in results["methods"].items():
            budget = metrics.get("kl_budget")
            if budget is None or (args.methods and name not in args.methods.split(",")):
                continue
            step = budget["kept_step"]  # None: never over the budget, the model of the last estimate
            kept = budget["estimates"][-1][1] if step is None else dict(budget["estimates"]).get(step, 0.0)
            base, tok = load_bundled()
            model = PeftModel.from_pretrained(base, str(args.folder / name))
            s = sample(model, tok, prompts, settings, n=args.samples, seed=args.seed)
            kl = kl_on_samples(s.logps, sequence_logps(model, tok, s, temperature=settings.temperature, adapter_off=True))
            row = {"seed": results["seed"], "method": name, "kept_step": budget["kept_step"], "budget_estimate": kept,
                   "recheck": kl, "ratio": kl / kept if kept else None, "held_out_kl": metrics["kl"]}
            out[f"{results['seed']}:{name}"] = row
            print(json.dumps(row), flush=True)
    (args.folder / f"recheck_kl_seed{args.seed}.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
