"""Side-by-side benchmark of hfrlhf against TRL: the same model, data, batch, max_length and precision.

Each run is a fresh process (``bench/worker.py``) so peak RSS is per run; the two libraries alternate, and
every configuration repeats ``--repeats`` times. Results go to ``bench/results/<name>.json`` and the table
in ``docs/benchmarks.md`` is rebuilt from every results file.

    python bench/run.py --tasks dpo kto reward --repeats 3 --quick   # the main table (main.json)
    python bench/run.py --tasks ablation --name ablation               # hfrlhf's layouts and cached reference
    python bench/run.py --ppo                                          # PPO against TRL 1.12 (ppo.json)
    python bench/run.py --memory --lengths 256 512 1024 2048          # peak memory against length
    python bench/run.py --report                                      # rebuild docs/benchmarks.md only

``bash bench/all.sh`` runs them all with the settings of the published page.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from report import report
from worker import timed_matmuls

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


TRL112_PYTHON = ROOT / "bench" / ".venv-trl112" / "bin" / "python"


def run_worker(args: list[str], script: str = "worker.py", python: str | os.PathLike = sys.executable) -> dict:
    cmd = [str(python), str(ROOT / "bench" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    raise RuntimeError(f"benchmark run failed: {' '.join(args)}\n{proc.stderr[-3000:]}")


def matmul_peak(threads: int | None = None, seconds: float = 1.5) -> dict:
    """Measured bf16 and fp32 matmul throughput (GFLOP/s) at ``threads``: the ceiling for training.

    Square matmuls of up to 2048; smaller where a dtype is so slow (bf16 without bf16 units runs hundreds of
    times slower than fp32) that one 2048 product would take more than half a second.
    """
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    out = {}
    try:
        for dtype in (torch.bfloat16, torch.float32):
            n = 256
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            a @ b
            t = time.perf_counter()
            a @ b
            rate = 2 * n**3 / max(time.perf_counter() - t, 1e-9)
            while n < 2048 and 2 * (2 * n) ** 3 / rate < 0.5:
                n *= 2
            out[str(dtype).replace("torch.", "")] = timed_matmuls(dtype, n, seconds)
            out[f"{str(dtype).replace('torch.', '')}_n"] = n
    finally:
        torch.set_num_threads(before)
    return out


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# hfrlhf's shared-prompt rows hold up to two full pairs' worth of tokens (max_tokens_per_row = 2 * max_length):
# prompts with their completions packed several to a row, no padding between them
PACK = ["--layout", "shared_prompt", "--max_tokens_per_row", "{2L}"]

VARIANTS: dict[str, dict[str, list[str]]] = {
    # label -> worker flags; labels starting with "trl" run TRL, the others hfrlhf
    # "+cached-ref": both libraries precompute the reference log-probs before training (each one's documented
    # precompute_ref_log_probs option), and each is compared with the other's run of the same setting
    "dpo": {"trl": [], "hfrlhf": PACK,
            "trl+cached-ref": ["--precompute_ref"],
            "hfrlhf+cached-ref": [*PACK, "--precompute_ref"],
            "hfrlhf padded": ["--layout", "padded"], "hfrlhf packed": ["--layout", "packed"]},
    # the layouts side by side, under the same machine load (the cached reference is in the main table)
    "ablation": {"hfrlhf padded": ["--layout", "padded"], "hfrlhf packed": ["--layout", "packed"],
                 "hfrlhf shared_prompt": ["--layout", "shared_prompt"], "hfrlhf shared_prompt packed": PACK},
    # KTO: each prompt once with its completions (prompt groups packed several to a row), the KL pairs in rows of
    # their own without grad
    "kto": {"trl": [], "hfrlhf": PACK, "hfrlhf shared_prompt": ["--layout", "shared_prompt"],
            "hfrlhf padded": ["--layout", "padded"]},
    "reward": {"trl": [], "hfrlhf": PACK},
}


def _flags(extra: list[str], max_length: int) -> list[str]:
    return [f.replace("{2L}", str(2 * max_length)) for f in extra]


def main_table(tasks: list[str], repeats: int, common: list[str], name: str, quick: bool, max_length: int) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "command": "python " + " ".join(sys.argv), "loadavg_start": _loadavg(),
              "runs": []}
    for task in tasks:
        variants = VARIANTS[task]
        if quick:
            variants = {k: v for k, v in variants.items() if k in ("trl", "hfrlhf", "trl+cached-ref", "hfrlhf+cached-ref")}
        for rep in range(repeats):
            for label, extra in variants.items():  # alternate the libraries inside each repeat
                lib = "trl" if label.startswith("trl") else "hfrlhf"
                worker_task = "dpo" if task == "ablation" else task
                res = run_worker(["--lib", lib, "--task", worker_task, "--seed", "0", *common,
                                  *_flags(extra, max_length)])
                res["variant"], res["repeat"] = label, rep
                record["runs"].append(res)
                print(f"{task} {label} rep {rep}: {res['median_step_s']:.2f} s/step, {res['tokens_per_s']:.0f} tok/s, "
                      f"{res['peak_rss_gb']:.2f} GB, load {res['loadavg_start'][0]:.1f}->{res['loadavg_end'][0]:.1f}",
                      flush=True)
                # write after every run: a long benchmark interrupted still leaves its results
                record["loadavg_end"] = _loadavg()
                (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    from hfrlhf.models.loading import bf16_supported

    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "bf16_supported": bf16_supported(), "torch_threads": torch.get_num_threads(),
            "matmul_gflops": matmul_peak(), "matmul_gflops_1_thread": matmul_peak(1)}


def memory_scaling(lengths: list[int], common: list[str], batch: int, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "loadavg_start": _loadavg(), "runs": []}
    for length in lengths:
        for lib, extra in (("trl", []), ("hfrlhf", _flags(PACK, length))):
            res = run_worker(["--lib", lib, "--task", "dpo", "--steps", "1", "--warmup", "0", "--batch", str(batch),
                              "--max_length", str(length), "--long", *common, *extra])
            record["runs"].append(res)
            print(f"len {length} {lib}: {res['peak_rss_gb']:.2f} GB, {res['median_step_s']:.1f} s/step", flush=True)
            record["loadavg_end"] = _loadavg()
            (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def ppo(repeats: int, common: list[str], steps: int, warmup: int, name: str) -> None:
    """hfrlhf's PPOTrainer against TRL 1.12's, each in its own environment, alternating."""
    if not TRL112_PYTHON.exists():
        raise SystemExit("TRL 1.12 is not installed: run bash bench/setup_trl112.sh first")
    from hfrlhf.models.bundled import bundled_model_path

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(sys.argv), "loadavg_start": _loadavg(), "runs": []}
    args = ["--model_path", str(bundled_model_path()), "--steps", str(steps), "--warmup", str(warmup), *common]
    for rep in range(repeats):
        for lib, python in (("trl", TRL112_PYTHON), ("hfrlhf", sys.executable)):
            res = run_worker(["--lib", lib, *args], script="ppo_worker.py", python=python)
            res["variant"], res["repeat"] = lib, rep
            record["runs"].append(res)
            print(f"ppo {lib} rep {rep}: {res['median_step_s']:.1f} s/step, {res['rollout_tokens_per_s']:.1f} rollout tok/s, "
                  f"{res['peak_rss_gb']:.2f} GB", flush=True)
            record["loadavg_end"] = _loadavg()
            (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["dpo", "kto", "reward"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed optimizer steps per run (after --warmup)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=2, help="pairs per step (KTO: twice as many single completions)")
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads in every run (both libraries)")
    ap.add_argument("--quick", action="store_true", help="each library's default variant and cached reference only (no layout ablation)")
    ap.add_argument("--memory", action="store_true", help="peak memory against --lengths (DPO, data filling max_length)")
    ap.add_argument("--ppo", action="store_true", help="PPO against TRL 1.12 (needs bash bench/setup_trl112.sh)")
    ap.add_argument("--lengths", nargs="+", type=int, default=[256, 512, 1024, 2048])
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--name", default=None)
    a = ap.parse_args()
    if a.report:
        report()
        return
    common = ["--precision", a.precision] + (["--threads", str(a.threads)] if a.threads else [])
    if a.ppo:
        ppo(a.repeats, common, a.steps, a.warmup, a.name or "ppo")
    elif a.memory:
        memory_scaling(a.lengths, common, a.batch, a.name or "memory")
    else:
        common += ["--steps", str(a.steps), "--warmup", str(a.warmup), "--batch", str(a.batch),
                   "--max_length", str(a.max_length)]
        main_table(a.tasks, a.repeats, common, a.name or "main", a.quick, a.max_length)
    report()


if __name__ == "__main__":
    main()
