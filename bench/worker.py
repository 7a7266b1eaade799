"""One benchmark run in a fresh process: one library, one task, a few timed optimizer steps.

Run by ``bench/run.py``; prints one JSON line. Alone:
    python bench/worker.py --lib hfrlhf --task dpo --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_WORDS = (
    "the a movie film story actor music food service place people time day night city road book game team "
    "good bad great terrible wonderful boring funny slow quick bright dark happy sad friendly rude clean dirty "
    "really very quite rather somewhat never always often sometimes usually and but or because so while when "
    "i you we they it she he this that these those my your our their is was were are be been being have had "
    "think feel believe know see watch hear read write eat drink visit try love hate like enjoy prefer recommend "
    "price value quality staff room view beach hotel garden weather coffee pizza phone laptop camera car train"
).split()


def make_rows(task: str, n: int, seed: int) -> list[dict]:
    """Reproducible synthetic preference data: prompts of 20-200 tokens, completions of 20-300 tokens."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        # ~1.2 tokens per word with SmolLM2's tokenizer
        return " ".join(rng.choice(_WORDS) for _ in range(int(rng.randint(lo, hi) / 1.2)))

    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": text(20, 170)}]
        chosen = [{"role": "assistant", "content": text(20, 280)}]
        rejected = [{"role": "assistant", "content": text(20, 280)}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if task == "kto":
        unpaired = []
        for r in rows:
            unpaired.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            unpaired.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        rng.shuffle(unpaired)
        return unpaired
    return rows


def _count_tokens(tok, rows: list[dict], task: str) -> float:
    """Mean real (non-pad) tokens trained per row: prompt + completion for every sequence of the row."""
    total = 0
    for r in rows:
        p = len(tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False))
        comps = [r["completion"]] if task == "kto" else [r["chosen"], r["rejected"]]
        for c in comps:
            total += p + len(tok.apply_chat_template(r["prompt"] + c, return_dict=False)) - p
    return total / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["hfrlhf", "trl"], required=True)
    ap.add_argument("--task", choices=["dpo", "kto", "reward"], required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (KTO: 2x completions)")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--layout", default="shared_prompt")
    ap.add_argument("--precompute_ref", action="store_true")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora_r", type=int, default=16)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback

    from hfrlhf.models.loading import load_bundled

    torch.manual_seed(a.seed)
    batch = a.batch * 2 if a.task == "kto" else a.batch
    n_steps = a.steps + a.warmup
    rows = make_rows(a.task, batch * n_steps, a.seed)
    model, tok = load_bundled(reward=a.task == "reward")
    task_type = "SEQ_CLS" if a.task == "reward" else "CAUSAL_LM"
    peft_config = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules="all-linear",
                             task_type=task_type)
    bf16 = a.precision == "bf16"
    common = dict(output_dir=f"/tmp/hfrlhf-bench-{a.lib}-{a.task}", report_to=[], save_strategy="no",
                  per_device_train_batch_size=batch, max_steps=n_steps, logging_steps=1000, disable_tqdm=True,
                  bf16=bf16, use_cpu=True, gradient_checkpointing=False, seed=a.seed, max_length=a.max_length,
                  learning_rate=1e-5)

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    timer = Timer()
    ds = Dataset.from_list(rows)
    t0 = time.perf_counter()
    if a.lib == "trl":
        import trl

        if a.task == "dpo":
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, precompute_ref_log_probs=a.precompute_ref),
                                     train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[timer])
        elif a.task == "kto":
            trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common, precompute_ref_log_probs=a.precompute_ref),
                                     train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=[timer])
        else:
            trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=ds,
                                        processing_class=tok, peft_config=peft_config, callbacks=[timer])
    else:
        import hfrlhf.trainers as T

        if a.task == "dpo":
            cfg = T.DPOConfig(**common, layout=a.layout, precompute_ref_log_probs=a.precompute_ref,
                              ref_cache_dir=f"/tmp/hfrlhf-bench-refcache-{os.getpid()}")
            trainer = T.DPOTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                   callbacks=[timer])
        elif a.task == "kto":
            cfg = T.KTOConfig(**common, layout=a.layout if a.layout != "shared_prompt" else "padded",
                              precompute_ref_log_probs=a.precompute_ref)
            trainer = T.KTOTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                   callbacks=[timer])
        else:
            cfg = T.RewardConfig(**common, layout=a.layout)
            trainer = T.RewardTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                      callbacks=[timer])
    setup_s = time.perf_counter() - t0
    trainer.train()
    times = sorted(timer.times[a.warmup:])
    median = times[len(times) // 2] if len(times) % 2 else sum(times[len(times) // 2 - 1: len(times) // 2 + 1]) / 2
    tokens_per_step = _count_tokens(tok, rows, a.task) * batch
    n_params = sum(p.numel() for p in model.parameters())
    # forward 2N + backward (input grads only, frozen base) 2N per trained token; + 2N for a reference forward
    flops_per_token = (4 + (2 if a.task in ("dpo", "kto") and not a.precompute_ref else 0)) * n_params
    out = {
        "lib": a.lib, "task": a.task, "layout": a.layout if a.lib == "hfrlhf" else "trl", "precision": a.precision,
        "precompute_ref": a.precompute_ref, "batch": batch, "max_length": a.max_length,
        "step_times": timer.times, "median_step_s": median, "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / median, "gflops": flops_per_token * tokens_per_step / median / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "setup_s": setup_s,
    }
    sys.stdout.write("BENCH " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
