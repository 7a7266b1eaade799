"""bench/report.py: docs/benchmarks.md is what it builds from the stored results, and the targets it states."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_page_is_the_one_built_from_the_stored_results(monkeypatch):
    # a number edited by hand in docs/benchmarks.md, or a results file changed without regenerating, fails here
    report = _report()
    monkeypatch.setattr(report, "_plot_memory", lambda *a, **k: None)  # the page only: the plot stays untouched
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.build()


def test_targets_are_judged_against_their_thresholds_and_the_bf16_peak_only_where_there_is_one():
    report = _report()
    ratios = {("dpo", "hfrlhf"): {"speed": 2.9, "rss": 0.5, "peak_frac": 0.87, "baseline": ""},
              ("reward", "hfrlhf"): {"speed": 2.1, "rss": 0.5, "peak_frac": 0.5, "baseline": ""}}
    lines = "\n".join(report.targets_section(ratios, {}))
    assert "dpo: trained tokens/s 2.90x TRL 1.16 (target 3x): NOT met." in lines
    assert "reward: trained tokens/s 2.10x TRL 1.16 (target 2x): met." in lines
    assert "kto: not measured." in lines
    assert "DPO peak RSS: 0.50x TRL's (target at most 0.6x): met." in lines
    assert "87% of the measured matmul peak of the precision used (target 40%): met." in lines
    no_bf16 = "\n".join(report.targets_section(ratios, {}, bf16=False))
    assert "does not apply" in no_bf16 and "(target 40%): met" not in no_bf16
