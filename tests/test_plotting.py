import struct

import pytest

from hfrlhf.plotting import PNG_MAGIC, panels, plot_log_history


def _png_size(path):
    """Width and height from the IHDR chunk that follows the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _dpo_history(steps=6):
    history = []
    for s in range(1, steps + 1):
        history.append({"step": s, "epoch": s / steps, "loss": 0.69 - 0.05 * s, "rewards/margins": 0.1 * s,
                        "rewards/accuracies": min(1.0, 0.5 + 0.1 * s), "kl": 0.01 * s, "learning_rate": 1e-5})
        if s % 3 == 0:
            history.append({"step": s, "eval_loss": 0.7 - 0.04 * s, "eval_rewards/margins": 0.08 * s,
                            "eval_rewards/accuracies": 0.6})
    history.append({"step": steps, "train_loss": 0.5, "train_runtime": 12.0})
    return history


def test_dpo_curves_make_a_valid_png(tmp_path):
    path = plot_log_history(_dpo_history(), tmp_path / "sub" / "curves.png", title="dpo")
    width, height = _png_size(path)
    assert width >= 4 * 400 and height >= 300  # four panels side by side
    assert path.stat().st_size > 10_000


def test_panels_pick_what_was_logged():
    found = dict(panels(_dpo_history()))
    assert list(found) == ["loss", "reward margin", "preference accuracy", "KL to reference"]
    assert set(found["loss"]) == {"train", "eval"}
    steps, values = found["reward margin"]["eval"]
    assert steps == [3.0, 6.0] and values == pytest.approx([0.24, 0.48])


def test_ppo_curves_show_kl_and_scores(tmp_path):
    history = [{"step": s, "loss": 1.0 / s, "objective/kl": 0.02 * s, "objective/scores": -0.5 + 0.1 * s}
               for s in range(1, 5)]
    assert [t for t, _ in panels(history)] == ["loss", "KL to reference", "score"]
    _png_size(plot_log_history(history, tmp_path / "ppo.png"))


def test_nothing_logged_still_writes_a_png(tmp_path):
    path = plot_log_history([{"step": 2, "train_loss": 0.7, "train_runtime": 1.0}], tmp_path / "empty.png")
    assert _png_size(path)[0] > 0


def test_nan_values_are_skipped():
    history = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 0.5}]
    assert dict(panels(history))["loss"]["train"] == ([2.0], [0.5])
