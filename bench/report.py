"""Rebuild ``docs/benchmarks.md`` (and its plot) from ``bench/results/*.json``.

    python bench/report.py        # or: python bench/run.py --report

Every number in the page comes from a results file; the verdicts on the targets are computed here from
those numbers, so a new measurement rewrites them.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
MEMORY_PNG = "benchmarks_memory.png"

TARGETS = {"dpo": 3.0, "kto": 2.0, "reward": 2.0}  # trained tokens/s against TRL 1.16
DPO_RSS_TARGET = 0.6
PEAK_TARGET = 0.40


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _med(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _group(runs: list[dict], *keys: str) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in runs:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def _load_range(runs: list[dict]) -> str:
    values = [r["loadavg_start"][0] for r in runs] + [r["loadavg_end"][0] for r in runs]
    return f"{min(values):.1f}-{max(values):.1f}"


def _peak_for(machine: dict, precision: str, threads: int) -> float:
    key = "bfloat16" if precision == "bf16" else "float32"
    table = machine["matmul_gflops_1_thread"] if threads == 1 else machine["matmul_gflops"]
    return table[key]


def _run_peak(runs: list[dict], machine: dict) -> float:
    """The matmul ceiling of these runs: measured inside each run (before and after training, same threads,
    same machine load) where recorded, else the machine measurement at the start of the benchmark."""
    own = [sum(r["matmul_gflops_run"]) / 2 for r in runs if "matmul_gflops_run" in r]
    if own:
        return statistics.median(own)
    return _peak_for(machine, runs[0]["precision"], runs[0]["threads"])


def _training_rss(runs: list[dict]) -> str:
    """Peak RSS minus the peak before training (model, data and trainer built), where recorded."""
    rise = [r["peak_rss_gb"] - r["peak_rss_setup_gb"] for r in runs if "peak_rss_setup_gb" in r]
    return f"{statistics.median(rise):.2f}" if rise else "-"


def main_section(rec: dict, title: str = "hfrlhf against TRL 1.16: DPO, KTO, Reward") -> tuple[list[str], dict]:
    m = rec["machine"]
    p1, pn = m["matmul_gflops_1_thread"], m["matmul_gflops"]
    lines = [
        f"## {title}", "",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']}, bf16 units: "
        f"{'yes' if m['bf16_supported'] else 'no (AVX2 only)'}. Matmul throughput measured at the start of the run "
        f"(square products, while the machine was shared): fp32 {p1['float32']:.0f} GFLOP/s on 1 thread and "
        f"{pn['float32']:.0f} on {m['torch_threads']}; bf16 {p1['bfloat16']:.2f} GFLOP/s on 1 thread and "
        f"{pn['bfloat16']:.2f} on {m['torch_threads']}.", "",
        f"Command: `{rec['command']}`", "",
        "| task | variant | precision | threads | s/step | trained tokens/s | GFLOP/s (% of peak) | peak RSS GB "
        "| of which training GB | tokens/s vs TRL | RSS vs TRL | runs | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratios: dict = {}
    groups = _group(rec["runs"], "task", "variant")
    for (task, variant), runs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1].split("+")[1:], not kv[0][1].startswith("trl"))):
        # the baseline of a "+cached-ref" run is TRL with its own precomputed reference, when measured
        trl = groups.get((task, "trl" + variant[len("hfrlhf"):])) if variant.startswith("hfrlhf+") else None
        trl = trl or groups.get((task, "trl"))
        tps, rss, gf = _med(runs, "tokens_per_s"), _med(runs, "peak_rss_gb"), _med(runs, "gflops")
        peak = _run_peak(runs, m)
        speed = tps / _med(trl, "tokens_per_s") if trl else float("nan")
        mem = rss / _med(trl, "peak_rss_gb") if trl else float("nan")
        is_trl = variant.startswith("trl")
        if not is_trl:
            ratios[(task, variant)] = {"speed": speed, "rss": mem, "peak_frac": gf / peak,
                                       "baseline": "against TRL 1.16 with precompute_ref_log_probs=True"
                                       if trl is groups.get((task, "trl+cached-ref")) else "against TRL 1.16 without precomputation"}
        lines.append(
            f"| {task} | {variant} | {runs[0]['precision']} | {runs[0]['threads']} | {_med(runs, 'median_step_s'):.1f} "
            f"| {tps:.1f} | {gf:.1f} ({100 * gf / peak:.0f}%) | {rss:.2f} | {_training_rss(runs)} | "
            f"{'-' if is_trl else f'{speed:.2f}x'} | {'-' if is_trl else f'{mem:.2f}x'} "
            f"| {len(runs)} | {_load_range(runs)} |"
        )
    r0 = rec["runs"][0]
    lines += [
        "",
        f"Each run: {r0['batch']} {'pairs' if r0['task'] != 'kto' else 'completions'} per step (KTO: twice as many "
        f"single completions, the same sequences), `max_length={r0['max_length']}`, one warm-up step then timed "
        "steps, rows in dataset order so that both libraries time the same rows (trained tokens are counted on "
        "those rows); the table holds medians over runs. Peak RSS is the whole process (model load included); \"of "
        "which training\" is the rise of the peak during `train()` (recorded from the second DPO repeat on).",
        "",
    ]
    for extra in rec.get("task_runs", []):
        peak = extra["machine"]["matmul_gflops_1_thread"]["float32"]
        lines += [f"The {', '.join(extra['tasks'])} rows come from a run of their own, the libraries alternating in "
                  f"each repeat: `{extra['command']}` (fp32 matmul peak {peak:.0f} GFLOP/s on 1 thread at its start; "
                  f"load average {extra['load']}).", ""]
    return lines, ratios


def ppo_section(rec: dict) -> tuple[list[str], dict]:
    lines = ["## PPO against TRL 1.12", "",
             "TRL 1.16 ships no PPOTrainer; 1.12.0 is the last release with one (`trl.experimental.ppo`), run from its",
             "own environment (`bash bench/setup_trl112.sh`). Both: the bundled model with LoRA r=16 as policy, the same",
             "weights as a sequence classifier (seeded random head) as reward model, 4 prompts per step, at most 48",
             "sampled new tokens, 4 PPO epochs of one mini-batch. TRL 1.12 needs a separate value model and trains it in",
             "full; hfrlhf's critic is a second LoRA adapter with a value head on the policy's base model.", "",
             f"Command: `{rec['command']}`", "",
             "| library | precision | threads | s/step | rollout tokens/s | generation share of the step | peak RSS GB "
             "| step time vs TRL | RSS vs TRL | runs | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    groups = _group(rec["runs"], "lib")
    trl = groups.get(("trl",))
    out = {}
    for (lib,), runs in sorted(groups.items(), key=lambda kv: kv[0][0] != "trl"):
        step, rss = _med(runs, "median_step_s"), _med(runs, "peak_rss_gb")
        st = step / _med(trl, "median_step_s") if trl else float("nan")
        mem = rss / _med(trl, "peak_rss_gb") if trl else float("nan")
        if lib != "trl":
            out = {"time": st, "rss": mem}
        lines.append(f"| {lib} | {runs[0]['precision']} | {runs[0]['threads']} | {step:.1f} | "
                     f"{_med(runs, 'rollout_tokens_per_s'):.1f} | {100 * _med(runs, 'generation_share'):.0f}% | {rss:.2f} | "
                     f"{'-' if lib == 'trl' else f'{st:.2f}x'} | {'-' if lib == 'trl' else f'{mem:.2f}x'} | {len(runs)} "
                     f"| {_load_range(runs)} |")
    lines += ["", "Rollout tokens are rows x new positions that `generate` produced (sampling stops early only when "
              "every row has ended).", ""]
    return lines, out


def memory_section(rec: dict) -> list[str]:
    rows: dict[int, dict[str, dict]] = {}
    for r in rec["runs"]:
        rows.setdefault(r["max_length"], {})[r["lib"]] = r
    b = rec["runs"][0]["batch"]
    lines = ["## Peak memory against sequence length", "",
             f"DPO, {b} pair(s) per step, data whose every sequence fills `max_length`, one step per run.", "",
             f"Command: `{rec['command']}`", "",
             "| max_length | TRL peak RSS GB | hfrlhf peak RSS GB | hfrlhf / TRL | TRL s/step | hfrlhf s/step |",
             "|---|---|---|---|---|---|"]
    nan = {"peak_rss_gb": float("nan"), "median_step_s": float("nan")}
    for length, v in sorted(rows.items()):
        t, h = v.get("trl", nan), v.get("hfrlhf", nan)
        lines.append(f"| {length} | {t['peak_rss_gb']:.2f} | {h['peak_rss_gb']:.2f} | "
                     f"{h['peak_rss_gb'] / t['peak_rss_gb']:.2f}x | {t['median_step_s']:.1f} | {h['median_step_s']:.1f} |")
    _plot_memory({k: {lib: r["peak_rss_gb"] for lib, r in v.items()} for k, v in rows.items()}, b)
    lines += ["", f"![peak memory against length]({MEMORY_PNG})", ""]
    return lines


def _plot_memory(rows: dict[int, dict[str, float]], batch: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(rows)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for lib, label in (("trl", "TRL 1.16"), ("hfrlhf", "hfrlhf (shared prompt)")):
        ax.plot(xs, [rows[x].get(lib, float("nan")) for x in xs], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel("max_length (tokens, every sequence full)")
    ax.set_ylabel("peak RSS (GB)")
    ax.set_title(f"DPO, SmolLM2-135M + LoRA r=16, {batch} pair(s)/step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOC.parent / MEMORY_PNG, dpi=120)
    plt.close(fig)


def ablation_section(main: dict | None, ablation: dict | None) -> list[str]:
    """hfrlhf's DPO layouts side by side (one run of each, same conditions) and the cached reference."""
    lines = ["## What each fast path buys (DPO, hfrlhf only)", ""]
    if ablation is not None:
        lines += [f"The layouts, alternating under the same machine load: `{ablation['command']}`.", "",
                  "| layout | precision | s/step | trained tokens/s | peak RSS GB | tokens/s vs padded | runs | load avg |",
                  "|---|---|---|---|---|---|---|---|"]
        groups: dict[tuple, list[dict]] = {}
        for r in ablation["runs"]:
            cap = r.get("max_tokens_per_row")
            key = r["layout"] + (f", {cap} tokens per row" if cap and r["layout"] == "shared_prompt" else "")
            groups.setdefault((key,), []).append(r)
        base = groups.get(("padded",))
        for (layout,), runs in sorted(groups.items()):
            tps = _med(runs, "tokens_per_s")
            rel = f"{tps / _med(base, 'tokens_per_s'):.2f}x" if base else "-"
            lines.append(f"| {layout} | {runs[0]['precision']} | {_med(runs, 'median_step_s'):.1f} | {tps:.1f} | "
                         f"{_med(runs, 'peak_rss_gb'):.2f} | {rel} | {len(runs)} | {_load_range(runs)} |")
        lines.append("")
    else:
        lines += ["The layout ablation (stage 4 of `bench/all.sh`) was not run for this page.", ""]
    runs = [r for r in (main or {}).get("runs", []) if r["task"] == "dpo" and r["lib"] == "hfrlhf"]
    by = _group(runs, "precompute_ref")
    if (False,) in by and (True,) in by:
        off, on = _med(by[(False,)], "tokens_per_s"), _med(by[(True,)], "tokens_per_s")
        lines += [f"Cached reference log-probs (main table, shared-prompt layout): {on:.1f} against {off:.1f} trained "
                  f"tokens/s, {on / off:.2f}x.", ""]
    return lines


def targets_section(ratios: dict, ppo: dict, title: str = "## Targets", bf16: bool = True) -> list[str]:
    lines = [title, ""]
    for task, target in TARGETS.items():
        r = ratios.get((task, "hfrlhf"))
        if r is None:
            lines.append(f"- {task}: not measured.")
            continue
        verdict = "met" if r["speed"] >= target else "NOT met"
        lines.append(f"- {task}: trained tokens/s {r['speed']:.2f}x TRL 1.16 (target {target:.0f}x): {verdict}.")
        cached = ratios.get((task, "hfrlhf+cached-ref"))
        if cached is not None:
            lines.append(f"  With reference log-probs precomputed before training: {cached['speed']:.2f}x "
                         f"{cached['baseline']} (the precomputation, one forward over the data, is not in the "
                         "step time of either).")
    r = ratios.get(("dpo", "hfrlhf"))
    if r is not None:
        verdict = "met" if r["rss"] <= DPO_RSS_TARGET else "NOT met"
        lines.append(f"- DPO peak RSS: {r['rss']:.2f}x TRL's (target at most {DPO_RSS_TARGET}x): {verdict}.")
        if bf16:
            verdict = "met" if r["peak_frac"] >= PEAK_TARGET else "NOT met"
            lines.append(f"- DPO model FLOP/s: {100 * r['peak_frac']:.0f}% of the measured matmul peak of the "
                         f"precision used (target {100 * PEAK_TARGET:.0f}%): {verdict}.")
        else:
            lines.append(f"- DPO model FLOP/s: {100 * r['peak_frac']:.0f}% of this CPU's float32 matmul peak. The "
                         f"target ({100 * PEAK_TARGET:.0f}% of the bf16 peak) does not apply: the CPU has no bf16 "
                         "units (its bf16 products run at about 1 GFLOP/s).")
    if ppo:
        lines.append(f"- PPO (no ratio target): step time {ppo['time']:.2f}x TRL 1.12's, peak RSS {ppo['rss']:.2f}x.")
    lines.append("")
    return lines


def _with_task_runs(main: dict) -> dict:
    """``main`` with the rows of every task re-measured in a run of its own (``results/main_<name>.json``, same
    command-line shape, e.g. ``--tasks kto --name main_kto``) replacing that task's rows; each such run is named in
    ``main["task_runs"]`` for the page."""
    out = dict(main, task_runs=[])
    for path in sorted(RESULTS.glob("main_*.json")):
        rec = json.loads(path.read_text())
        tasks = sorted({r["task"] for r in rec["runs"]})
        out["runs"] = [r for r in out["runs"] if r["task"] not in tasks] + rec["runs"]
        out["task_runs"].append({"tasks": tasks, "command": rec["command"], "machine": rec["machine"],
                                 "load": _load_range(rec["runs"])})
    return out


def machine_sections() -> list[str]:
    """The same table measured on other machines (``results/machine_<name>.json``, written with ``--name
    machine_<name>``), each with the targets it meets there. The main table and its targets stay those of
    ``main.json``."""
    lines: list[str] = []
    for path in sorted(RESULTS.glob("machine_*.json")):
        rec = json.loads(path.read_text())
        m = rec["machine"]
        precision = "bf16" if m["bf16_supported"] else "fp32: no bf16 units"
        part, ratios = main_section(rec, f"On another machine: {m['cpu']}, {m['cpu_count']} cores ({precision})")
        lines += part + targets_section(ratios, {}, f"### Targets on the {m['cpu']} ({path.name})",
                                        bf16=m["bf16_supported"])
    return lines


def build() -> str:
    lines = ["# Benchmarks", ""]
    prose = (ROOT / "bench" / "benchmarks_intro.md")
    if prose.exists():
        lines += prose.read_text().rstrip().splitlines() + [""]
    ratios: dict = {}
    ppo: dict = {}
    body: list[str] = []
    if (rec := _load("main")) is not None:
        part, ratios = main_section(_with_task_runs(rec))
        body += part
    if (rec := _load("ppo")) is not None:
        part, ppo = ppo_section(rec)
        body += part
    if (rec := _load("memory")) is not None:
        body += memory_section(rec)
    body += ablation_section(_load("main"), _load("ablation"))
    body += machine_sections()
    lines += targets_section(ratios, ppo) + body
    notes = ROOT / "bench" / "benchmarks_notes.md"
    if notes.exists():
        lines += notes.read_text().rstrip().splitlines() + [""]
    return "\n".join(lines).rstrip() + "\n"


def report() -> None:
    DOC.write_text(build())
    print(f"wrote {DOC}")


if __name__ == "__main__":
    report()
