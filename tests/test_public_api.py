"""The public import surface: every exported name resolves, to the object its home module defines, lazily."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest

import hfrlhf

LAZY_PACKAGES = ["hfrlhf", "hfrlhf.trainers", "hfrlhf.models"]
EAGER_PACKAGES = ["hfrlhf.data", "hfrlhf.losses", "hfrlhf.ops"]


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_export_resolves_to_its_home_object(package):
    module = importlib.import_module(package)
    assert module.__all__ == sorted(module.__all__)
    for name in module.__all__:
        home = importlib.import_module(module._EXPORTS[name] if "." in module._EXPORTS[name]
                                       else f"{package}.{module._EXPORTS[name]}")
        obj = getattr(module, name)
        assert obj is getattr(home, getattr(module, "_RENAMES", {}).get(name, name)), name
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__), f"{name} has no docstring"


@pytest.mark.parametrize("package", EAGER_PACKAGES)
def test_every_eager_export_resolves(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_unknown_names_raise_attribute_error(package):
    module = importlib.import_module(package)
    with pytest.raises(AttributeError, match="no_such_name"):
        module.no_such_name  # noqa: B018
    assert not hasattr(module, "no_such_name")


def test_what_users_need_is_exported_at_the_top():
    needed = {
        "DPOTrainer", "DPOConfig", "RewardTrainer", "RewardConfig", "KTOTrainer", "KTOConfig", "PPOTrainer",
        "PPOConfig", "SFTTrainer", "SFTConfig", "KTOCollator", "add_kl_partners", "score_completions",
        "sequence_rewards", "reward_model_from_causal_lm", "Rollout", "Responses", "ActorCritic", "ValueHead",
        "get_reward_fn", "load_dataset", "load_bundled", "ModelArguments", "get_loss", "push_to_hub",
        "plot_log_history",
    }
    assert needed <= set(hfrlhf.__all__)
    assert set(hfrlhf.__all__) <= set(dir(hfrlhf))
    assert hfrlhf.load_dataset is importlib.import_module("hfrlhf.data").load


def test_reward_helpers_keep_their_first_import_path():
    from hfrlhf.models import reward_head
    from hfrlhf.trainers import reward

    for name in ["sequence_rewards", "score_completions", "reward_model_from_causal_lm"]:
        assert getattr(reward, name) is getattr(reward_head, name)
        assert name in reward.__all__


def test_import_hfrlhf_loads_no_heavy_dependency():
    code = ("import sys, hfrlhf; heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') "
            "if m in sys.modules]; print(heavy); assert heavy == [], heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr + done.stdout
