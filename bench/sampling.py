"""Sampling speed with and without merged LoRA weights (``hfrlhf.ops.lora.merged_lora``), on the bundled model.

    python bench/sampling.py --threads 1 --rows 16 --new_tokens 40 --repeats 3

SmolLM2-135M-Instruct with a LoRA adapter (r=16 on every linear layer, its B made non-zero so that the adapter
changes the function), bf16 autocast where the CPU has bf16 units (else float32), one ``generate`` call of
``--rows`` prompts sampling ``--new_tokens`` tokens (no stop token, so every call samples all of them). The two
paths alternate, each timed ``--repeats`` times after one warm-up call; prints the medians and writes
``bench/results/sampling.json``. Both paths cast the frozen weights once per call (``cached_linear_casts``);
only the LoRA layers differ: peft's three products per layer and token, or one with the merged weight. The merge
is float32-only now (rounded to bf16 it erases a trained adapter's change; bench/benchmarks_notes.md), so under
bf16 the two paths compute the same thing; the stored result is the earlier bf16-merge measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

import hfrlhf.ops.rollout as rollout
from hfrlhf.data.collators import PromptCollator
from hfrlhf.models.loading import bf16_supported, load_bundled
from hfrlhf.ops.rollout import make_generation_config

RESULTS = Path(__file__).resolve().parent / "results" / "sampling.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new_tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_bundled()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Write a short review of restaurant {i}."}],
                                       add_generation_prompt=True, return_dict=False) for i in range(args.rows)]
    batch = PromptCollator(tok.pad_token_id)([{"prompt_ids": p} for p in prompts])
    config = make_generation_config(max_new_tokens=args.new_tokens, temperature=0.7, top_k=None, top_p=1.0,
                                    stop_token_ids=[], pad_token_id=tok.pad_token_id)
    bf16 = bf16_supported()
    merged_lora = rollout.merged_lora

    def run(merged: bool) -> tuple[float, torch.Tensor]:
        rollout.merged_lora = merged_lora if merged else (lambda model: contextlib.nullcontext(0))
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            start = time.perf_counter()
            ids = rollout.generate(model, batch["input_ids"], batch["attention_mask"], config)
            return time.perf_counter() - start, ids

    run(True), run(False)  # warm-up
    times: dict[str, list[float]] = {"peft": [], "merged": []}
    same = []
    for _ in range(args.repeats):
        t_plain, ids_plain = run(False)
        t_merged, ids_merged = run(True)
        times["peft"].append(t_plain)
        times["merged"].append(t_merged)
        same.append((ids_plain == ids_merged).float().mean().item())
    rollout.merged_lora = merged_lora
    result = {"rows": args.rows, "new_tokens": args.new_tokens, "threads": args.threads, "bf16": bf16,
              "repeats": args.repeats, "seconds": times,
              "median_peft": statistics.median(times["peft"]), "median_merged": statistics.median(times["merged"]),
              "same_tokens": statistics.mean(same), "load_average": os.getloadavg()[0]}
    result["speedup"] = result["median_peft"] / result["median_merged"]
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.rows} rows x {args.new_tokens} tokens, {'bf16' if bf16 else 'fp32'}, {args.threads} thread(s): "
          f"peft {result['median_peft']:.2f} s, merged {result['median_merged']:.2f} s "
          f"({result['speedup']:.2f}x); same tokens {result['same_tokens']:.1%}; load {result['load_average']:.1f}")


if __name__ == "__main__":
    main()
