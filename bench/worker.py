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


def make_rows(task: str, n: int, seed: int, long: int | None = None) -> list[dict]:
    """Reproducible synthetic preference data: prompts of 20-200 tokens, completions of 20-300 tokens.

    With ``long=L`` every sequence is longer than ``L`` tokens (prompt about L/4, completions about L), so
    after truncation to ``max_length=L`` each one fills it: the data of the memory curve.
    """
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        # ~1.2 tokens per word with SmolLM2's tokenizer
        return " ".join(rng.choice(_WORDS) for _ in range(int(rng.randint(lo, hi) / 1.2)))

    p_range, c_range = ((20, 170), (20, 280)) if long is None else ((long // 4, long // 4), (long, long))
    rows = []
    for _ in range(n):
        prompt = [{"role": "user", "content": text(*p_range)}]
        chosen = [{"role": "assistant", "content": text(*c_range)}]
        rejected = [{"role": "assistant", "content": text(*c_range)}]
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if task == "kto":
        unpaired = []
        for r in rows:
            unpaired.append({"prompt": r["prompt"], "completion": r["chosen"], "label": True})
            unpaired.append({"prompt": r["prompt"], "completion": r["rejected"], "label": False})
        rng.shuffle(unpaired)
        return unpaired
    return rows


def count_tokens(tok, rows: list[dict], task: str, max_length: int) -> float:
    """Mean trained tokens per row, one definition for both libraries.

    Every sequence of a row (chosen and rejected; KTO's one completion) counts its real tokens, prompt
    included, as the chat template renders them, capped at ``max_length``: what a padded layout runs
    through the model, without the padding. A layout that runs a shared prompt only once does less work
    for the same count, which is the point of that layout.
    """
    total = 0
    for r in rows:
        comps = [r["completion"]] if task == "kto" else [r["chosen"], r["rejected"]]
        for c in comps:
            total += min(len(tok.apply_chat_template(r["prompt"] + c, return_dict=False)), max_length)
    return total / len(rows)


_PROMPT_COLUMNS = ("prompt_ids", "prompt_input_ids")
_SEQUENCE_COLUMNS = ("chosen_ids", "rejected_ids", "completion_ids", "chosen_input_ids", "rejected_input_ids",
                     "input_ids")


def count_trained_tokens(dataset, max_length: int) -> tuple[float, list[str]]:
    """Mean tokens per row that a trainer really trains on, read from its own tokenized dataset.

    Each sequence counts prompt + completion tokens (or the whole sequence where a library stores it in one
    column), capped at ``max_length``. Returns the mean and the columns read, so the rule is checkable.
    """
    cols = dataset.column_names
    prompt = next((c for c in _PROMPT_COLUMNS if c in cols), None)
    seqs = [c for c in _SEQUENCE_COLUMNS if c in cols and c != prompt]
    if not seqs:
        raise ValueError(f"no token columns among {cols}")
    total = 0
    for row in dataset.select_columns(([prompt] if prompt else []) + seqs):
        p = len(row[prompt]) if prompt else 0
        total += sum(min(p + len(row[c]), max_length) for c in seqs)
    return total / len(dataset), ([prompt] if prompt else []) + seqs


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the device runs it fast (the library's own rule), else fp32."""
    if precision != "auto":
        return precision
    from hfrlhf.models.loading import bf16_supported

    return "bf16" if bf16_supported() else "fp32"


def matmul_rate(dtype_name: str, n: int = 1024, seconds: float = 1.0) -> float:
    """GFLOP/s of square ``n`` matmuls in this process, now: the ceiling under the run's own conditions
    (thread count, and whatever else the machine is doing). bf16 without bf16 units uses n=256: it is slow."""
    import torch

    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    n = n if dtype == torch.float32 or _bf16_fast() else 256
    return timed_matmuls(dtype, n, seconds)


def timed_matmuls(dtype, n: int, seconds: float) -> float:
    """GFLOP/s of back-to-back ``n x n`` matmuls in ``dtype`` for about ``seconds`` (after one warm-up)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t = 0, time.perf_counter()
    while reps == 0 or time.perf_counter() - t < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def _bf16_fast() -> bool:
    import torch

    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def median(xs: list[float]) -> float:
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else (xs[m - 1] + xs[m]) / 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["hfrlhf", "trl"], required=True)
    ap.add_argument("--task", choices=["dpo", "kto", "reward"], required=True)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="pairs per step (KTO: 2x completions)")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--layout", default="shared_prompt")
    ap.add_argument("--precompute_ref", action="store_true")
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                    help="auto: bf16 where the device runs it fast (as the library decides), else fp32")
    ap.add_argument("--long", action="store_true", help="every sequence fills max_length (memory curve)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--chunk", type=int, default=None, help="hfrlhf's logprob_chunk_size (default: the library's)")
    ap.add_argument("--max_tokens_per_row", type=int, default=None,
                    help="hfrlhf's row capacity (shared_prompt: pack prompts with their completions several to a row)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora_r", type=int, default=16)
    return ap.parse_args(argv)


def build_trainer(a: argparse.Namespace, callbacks: list | None = None):
    """The model, data and trainer of one run. Returns ``(trainer, tokenizer, rows, n_matmul, precision)``;
    ``n_matmul`` is the weight count of the model-FLOPs formula."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig

    from hfrlhf.models.loading import load_bundled

    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    precision = resolve_precision(a.precision)
    batch = a.batch * 2 if a.task == "kto" else a.batch
    n_steps = a.steps + a.warmup
    rows = make_rows(a.task, batch * n_steps, a.seed, long=a.max_length if a.long else None)
    model, tok = load_bundled(reward=a.task == "reward")
    # model FLOPs per token and pass (MFU convention: the same count for both libraries, whatever each one
    # executes): 2 per weight of the decoder, plus the vocabulary head for a causal LM (tied to the embedding,
    # so counted once in parameters()); a reward model's head is one row and its embedding a lookup
    n_total = sum(p.numel() for p in model.parameters())
    n_embed = model.get_input_embeddings().weight.numel()
    n_matmul = n_total if a.task != "reward" else n_total - n_embed
    task_type = "SEQ_CLS" if a.task == "reward" else "CAUSAL_LM"
    peft_config = LoraConfig(r=a.lora_r, lora_alpha=2 * a.lora_r, lora_dropout=0.0, target_modules="all-linear",
                             task_type=task_type)
    bf16 = precision == "bf16"
    common = dict(output_dir=f"/tmp/hfrlhf-bench-{a.lib}-{a.task}", report_to=[], save_strategy="no",
                  per_device_train_batch_size=batch, max_steps=n_steps, logging_steps=1000, disable_tqdm=True,
                  bf16=bf16, use_cpu=True, gradient_checkpointing=False, seed=a.seed, max_length=a.max_length,
                  learning_rate=1e-5,
                  # rows in dataset order: both libraries time the same rows (a random order differs between
                  # them, and one timed step of a short batch against a long one says nothing)
                  train_sampling_strategy="sequential")
    callbacks = callbacks or []
    ds = Dataset.from_list(rows)
    if a.lib == "trl":
        import trl

        if a.task == "dpo":
            trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**common, precompute_ref_log_probs=a.precompute_ref),
                                     train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=callbacks)
        elif a.task == "kto":
            trainer = trl.KTOTrainer(model=model, args=trl.KTOConfig(**common, precompute_ref_log_probs=a.precompute_ref),
                                     train_dataset=ds, processing_class=tok, peft_config=peft_config, callbacks=callbacks)
        else:
            trainer = trl.RewardTrainer(model=model, args=trl.RewardConfig(**common), train_dataset=ds,
                                        processing_class=tok, peft_config=peft_config, callbacks=callbacks)
    else:
        import hfrlhf.trainers as T

        if a.chunk:
            common["logprob_chunk_size"] = a.chunk
        rows_cap = {"max_tokens_per_row": a.max_tokens_per_row}

        if a.task == "dpo":
            cfg = T.DPOConfig(**common, **rows_cap, layout=a.layout, precompute_ref_log_probs=a.precompute_ref,
                              ref_cache_dir=f"/tmp/hfrlhf-bench-refcache-{os.getpid()}")
            trainer = T.DPOTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                   callbacks=callbacks)
        elif a.task == "kto":
            cfg = T.KTOConfig(**common, **rows_cap, layout=a.layout, precompute_ref_log_probs=a.precompute_ref)
            trainer = T.KTOTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                   callbacks=callbacks)
        else:
            cfg = T.RewardConfig(**common, **rows_cap, layout=a.layout)
            trainer = T.RewardTrainer(model, args=cfg, train_dataset=ds, processing_class=tok, peft_config=peft_config,
                                      callbacks=callbacks)
    return trainer, tok, rows, n_matmul, precision


def main() -> None:
    a = parse_args()

    import torch
    from transformers import TrainerCallback

    load_start = os.getloadavg()
    batch = a.batch * 2 if a.task == "kto" else a.batch

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t = 0.0

        def on_step_begin(self, args, state, control, **kw):
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self._t)

    timer = Timer()
    t0 = time.perf_counter()
    trainer, tok, rows, n_matmul, precision = build_trainer(a, [timer])
    setup_s = time.perf_counter() - t0
    peak_start = matmul_rate(precision)
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # model, data, trainer built
    # the tokens of the timed steps' rows (sequential order: warm-up rows first); all rows if a library dropped some
    data = trainer.train_dataset
    timed = range(a.warmup * batch, (a.warmup + a.steps) * batch)
    if len(data) == len(rows):
        data, rows = data.select(timed), [rows[i] for i in timed]
    trained_per_row, token_columns = count_trained_tokens(data, a.max_length)
    trainer.train()
    peak_end = matmul_rate(precision)
    med = median(timer.times[a.warmup:])
    tokens_per_step = trained_per_row * batch
    template_tokens_per_step = count_tokens(tok, rows, a.task, a.max_length) * batch
    # forward 2N + backward (input gradients only: the base is frozen under LoRA) 2N per trained token, + 2N
    # for a reference forward inside the step; LoRA's own matmuls (~1% of N) and attention are not counted
    flops_per_token = (4 + (2 if a.task in ("dpo", "kto") and not a.precompute_ref else 0)) * n_matmul
    out = {
        "lib": a.lib, "task": a.task, "layout": a.layout if a.lib == "hfrlhf" else "trl", "precision": precision,
        "precompute_ref": a.precompute_ref, "batch": batch, "max_length": a.max_length,
        "long": a.long, "threads": torch.get_num_threads(), "logprob_chunk_size": a.chunk,
        "max_tokens_per_row": a.max_tokens_per_row,
        "step_times": timer.times, "median_step_s": med, "tokens_per_step": tokens_per_step,
        "template_tokens_per_step": template_tokens_per_step, "token_columns": token_columns,
        "tokens_per_s": tokens_per_step / med, "flops_per_token": flops_per_token, "gflops": flops_per_token * tokens_per_step / med / 1e9,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "setup_s": setup_s,
        "peak_rss_setup_gb": setup_rss, "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
        "matmul_gflops_run": [peak_start, peak_end],
    }
    sys.stdout.write("BENCH " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
