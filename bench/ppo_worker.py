"""One PPO benchmark run in a fresh process: hfrlhf's PPOTrainer or TRL 1.12's ``trl.experimental.ppo``.

TRL 1.12.0 is the last TRL release with a PPOTrainer, so its runs use their own environment
(``bash bench/setup_trl112.sh``); ``bench/run.py --ppo`` starts each library with its own interpreter.
Prints one ``BENCH {json}`` line. Alone:

    python bench/ppo_worker.py --lib hfrlhf --model_path DIR
    bench/.venv-trl112/bin/python bench/ppo_worker.py --lib trl --model_path DIR

Both libraries get the same setting: the policy is the model at ``DIR`` with a LoRA adapter (r=16 on every
linear layer), the reward model the same weights as a sequence classifier with a seeded random head,
4 prompts per step (20-200 tokens, chat-formatted), at most 48 sampled new tokens (temperature 0.7, stop at
EOS), 4 PPO epochs of one mini-batch, KL coefficient 0.05. Each library builds its critic its own way: TRL
1.12 trains a separate full value model (it requires one), hfrlhf a second LoRA adapter with a value head on
the policy's base model.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
import warnings

warnings.filterwarnings("ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from worker import make_rows, median  # noqa: E402  (stdlib-only helpers shared with the main worker)


def _bf16_fast() -> bool:
    import torch

    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class _GenTimer:
    """Wraps a generation function: wall time of each call and the tokens it produced (rows x new positions)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.tokens: list[int] = []

    def wrap(self, fn, count):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            self.seconds.append(time.perf_counter() - t)
            self.tokens.append(count(out, *args))
            return out

        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["hfrlhf", "trl"], required=True)
    ap.add_argument("--model_path", required=True, help="a Hugging Face model folder (the converted bundled model)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4, help="prompts per step")
    ap.add_argument("--new_tokens", type=int, default=48)
    ap.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch
    from peft import LoraConfig
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )

    load_start = os.getloadavg()
    if a.threads:
        torch.set_num_threads(a.threads)
    precision = a.precision if a.precision != "auto" else ("bf16" if _bf16_fast() else "fp32")
    tok = AutoTokenizer.from_pretrained(a.model_path)
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(a.model_path, dtype=torch.float32)
    policy.generation_config.pad_token_id = tok.pad_token_id

    def classifier():
        torch.manual_seed(a.seed)  # the same random score head in both libraries
        m = AutoModelForSequenceClassification.from_pretrained(a.model_path, num_labels=1, dtype=torch.float32)
        m.config.pad_token_id = tok.pad_token_id
        return m

    reward_model = classifier()
    n_steps = a.steps + a.warmup
    rows = [{"prompt": r["prompt"]} for r in make_rows("dpo", a.batch * n_steps, a.seed)]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(output_dir=f"/tmp/hfrlhf-bench-ppo-{a.lib}", report_to=[], save_strategy="no",
                  per_device_train_batch_size=a.batch, num_mini_batches=1, num_ppo_epochs=4,
                  response_length=a.new_tokens, temperature=0.7, kl_coef=0.05, learning_rate=1e-5,
                  bf16=precision == "bf16", use_cpu=True, seed=a.seed, num_sample_generations=0, logging_steps=1000,
                  disable_tqdm=True, stop_token="eos")

    ends: list[float] = []

    class StepEnds(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            ends.append(time.perf_counter())

    gen = _GenTimer()
    t0 = time.perf_counter()
    if a.lib == "trl":
        from datasets import Dataset
        from trl.experimental.ppo import PPOConfig, PPOTrainer
        from trl.experimental.ppo import ppo_trainer as trl_ppo

        ids = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, return_dict=False) for r in rows]
        ds = Dataset.from_dict({"input_ids": ids})
        # query_responses (B, Tq + Tr): new positions = width minus the queries' width, times rows
        trl_ppo.batch_generation = gen.wrap(trl_ppo.batch_generation,
                                            lambda out, model, queries, *r: out[0].shape[0] * (out[0].shape[1] - queries.shape[1]))
        args = PPOConfig(**common, total_episodes=a.batch * n_steps, local_rollout_forward_batch_size=a.batch)
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward_model,
                             train_dataset=ds, value_model=classifier(), eval_dataset=ds, peft_config=lora,
                             callbacks=[StepEnds()])
    else:
        import hfrlhf.trainers.ppo as hf_ppo

        hf_ppo.generate = gen.wrap(hf_ppo.generate, lambda out, *r: out.numel())  # (B, Tr) new tokens
        args = hf_ppo.PPOConfig(**common, max_steps=n_steps)
        trainer = hf_ppo.PPOTrainer(args, tok, policy, reward_model=reward_model, train_dataset=rows, peft_config=lora,
                                    callbacks=[StepEnds()])
    setup_s = time.perf_counter() - t0
    trainer.train()
    step_times = [b - e for e, b in zip(ends, ends[1:])]
    timed = slice(a.warmup, None)
    gen_s, gen_tok = gen.seconds[timed], gen.tokens[timed]
    out = {
        "lib": a.lib, "task": "ppo", "precision": precision, "batch": a.batch, "new_tokens": a.new_tokens,
        "threads": torch.get_num_threads(), "step_times": step_times, "median_step_s": median(step_times[timed]),
        "generation_s": gen.seconds, "generated_tokens": gen.tokens,
        "rollout_tokens_per_s": sum(gen_tok) / sum(gen_s) if gen_s else float("nan"),
        "generation_share": sum(gen_s) / sum(step_times[timed]) if gen_s else float("nan"),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, "setup_s": setup_s,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(),
    }
    sys.stdout.write("BENCH " + json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
