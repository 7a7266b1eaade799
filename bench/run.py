"""Side-by-side benchmark of hfrlhf against TRL: the same model, data, batch, max_length and precision.

Each run is a fresh process (``bench/worker.py``) so peak RSS is per run; the two libraries alternate, and
every configuration repeats ``--repeats`` times. Results go to ``bench/results/<name>.json`` and the table
in ``docs/benchmarks.md`` is rebuilt from every results file.

    python bench/run.py --tasks dpo kto reward --repeats 3          # the main table
    python bench/run.py --memory --lengths 256 512 1024 2048          # peak memory against length
    python bench/run.py --report                                      # rebuild docs/benchmarks.md only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"


def run_worker(args: list[str]) -> dict:
    cmd = [sys.executable, str(ROOT / "bench" / "worker.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"benchmark run failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def matmul_peak(n: int = 2048, reps: int = 20) -> dict:
    """Measured bf16 and fp32 matmul throughput of this machine (GFLOP/s): the ceiling for training."""
    import torch

    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(3):
            a @ b
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        out[str(dtype).replace("torch.", "")] = 2 * n**3 * reps / (time.perf_counter() - t) / 1e9
    return out


def summarise(runs: list[dict]) -> dict:
    return {
        "median_step_s": statistics.median(r["median_step_s"] for r in runs),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
        "gflops": statistics.median(r["gflops"] for r in runs),
        "peak_rss_gb": statistics.median(r["peak_rss_gb"] for r in runs),
        "repeats": len(runs),
    }


def main_table(tasks: list[str], repeats: int, steps: int, variants: dict[str, list[str]], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "matmul_gflops": matmul_peak()},
              "command": "python " + " ".join(sys.argv), "runs": []}
    for task in tasks:
        for rep in range(repeats):
            for label, extra in variants.items():  # alternate the libraries inside each repeat
                lib = "trl" if label.startswith("trl") else "hfrlhf"
                res = run_worker(["--lib", lib, "--task", task, "--steps", str(steps), "--seed", "0", *extra])
                res["variant"] = label
                record["runs"].append(res)
                print(f"{task} {label} rep {rep}: {res['median_step_s']:.2f} s/step, "
                      f"{res['tokens_per_s']:.0f} tok/s, {res['peak_rss_gb']:.2f} GB", flush=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def memory_scaling(lengths: list[int], name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "runs": []}
    for length in lengths:
        for lib, extra in (("trl", []), ("hfrlhf", ["--layout", "shared_prompt"])):
            res = run_worker(["--lib", lib, "--task", "dpo", "--steps", "1", "--warmup", "1", "--batch", "2",
                              "--max_length", str(length), "--long", *extra])
            record["runs"].append(res)
            print(f"len {length} {lib}: {res['peak_rss_gb']:.2f} GB, {res['median_step_s']:.1f} s/step", flush=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def report() -> None:
    lines = ["# Benchmarks", "",
             "hfrlhf against TRL 1.16 on this CPU: the same model (bundled SmolLM2-135M-Instruct + LoRA r=16 on all",
             "linear layers), the same synthetic data (prompts 20-200 tokens, completions 20-300 tokens, seeded), the",
             "same batch, `max_length` and precision (bf16 autocast for both), each run in its own process, the",
             "libraries alternating, medians over repeats. Regenerate everything with `bash bench/all.sh`.", ""]
    main = RESULTS / "main.json"
    if main.exists():
        rec = json.loads(main.read_text())
        peak = rec["machine"]["matmul_gflops"]
        lines += [f"Machine: {rec['machine']['cpu_count']} cores; measured 2048x2048 matmul peak "
                  f"{peak['bfloat16']:.0f} GFLOP/s bf16, {peak['float32']:.0f} GFLOP/s fp32.", "",
                  f"Command: `{rec['command']}`", "",
                  "| task | variant | s/step | trained tokens/s | GFLOP/s (% of bf16 peak) | peak RSS GB | speed vs TRL | RSS vs TRL |",
                  "|---|---|---|---|---|---|---|---|"]
        by: dict[tuple[str, str], list[dict]] = {}
        for r in rec["runs"]:
            by.setdefault((r["task"], r["variant"]), []).append(r)
        for (task, variant), runs in sorted(by.items()):
            s = summarise(runs)
            trl_runs = by.get((task, "trl"))
            t = summarise(trl_runs) if trl_runs else None
            ratio = f"{s['tokens_per_s'] / t['tokens_per_s']:.2f}x" if t else "-"
            mem = f"{s['peak_rss_gb'] / t['peak_rss_gb']:.2f}x" if t else "-"
            lines.append(f"| {task} | {variant} | {s['median_step_s']:.2f} | {s['tokens_per_s']:.0f} | "
                         f"{s['gflops']:.0f} ({100 * s['gflops'] / peak['bfloat16']:.0f}%) | {s['peak_rss_gb']:.2f} | "
                         f"{ratio} | {mem} |")
        lines += ["", "GFLOP/s counts model FLOPs only: 2N per token forward, 2N backward (input gradients; the base is",
                  "frozen under LoRA), and 2N for a reference forward when the reference runs during the step, with N",
                  "the parameter count. Attention and the LoRA matmuls are not counted.", ""]
    mem = RESULTS / "memory.json"
    if mem.exists():
        rec = json.loads(mem.read_text())
        lines += ["## Peak memory against sequence length", "", f"Command: `{rec['command']}`", "",
                  "| max_length | TRL peak RSS GB | hfrlhf peak RSS GB |", "|---|---|---|"]
        rows: dict[int, dict[str, float]] = {}
        for r in rec["runs"]:
            rows.setdefault(r["max_length"], {})[r["lib"]] = r["peak_rss_gb"]
        for length, v in sorted(rows.items()):
            lines.append(f"| {length} | {v.get('trl', float('nan')):.2f} | {v.get('hfrlhf', float('nan')):.2f} |")
        _plot_memory(rows)
        lines += ["", "![peak memory against length](benchmarks_memory.png)", ""]
    DOC.write_text("\n".join(lines) + "\n")
    print(f"wrote {DOC}")


def _plot_memory(rows: dict[int, dict[str, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for lib in ("trl", "hfrlhf"):
        ax.plot(xs, [rows[x].get(lib, float("nan")) for x in xs], marker="o", label=lib)
    ax.set_xlabel("max_length (tokens)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title("DPO, SmolLM2-135M + LoRA, batch 2 pairs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOC.parent / "benchmarks_memory.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["dpo", "kto", "reward"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    if a.report:
        report()
        return
    if a.memory:
        memory_scaling(a.lengths, a.name or "memory")
    else:
        variants = {"trl": [], "hfrlhf": ["--layout", "shared_prompt"],
                    "hfrlhf+cached-ref": ["--layout", "shared_prompt", "--precompute_ref"]}
        main_table(a.tasks, a.repeats, a.steps, variants, a.name or "main")
    report()


if __name__ == "__main__":
    main()
