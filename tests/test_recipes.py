"""The recipes, their YAML configs and the launch configs: every recipe runs two steps on the tiny model."""

import dataclasses
import json
import os
import runpy
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.plotting import PNG_MAGIC
from hfrlhf.workflows import METHODS, get_workflow
from hfrlhf.workflows.args import ArgumentParser, ScriptArguments, parse_args, save_yaml, to_yaml

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
CONFIGS = RECIPES / "configs"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model runs are dominated by thread start-up and contention: one intra-op thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _recipe_methods() -> list[str]:
    return sorted(p.name.removesuffix("_llama.py") for p in RECIPES.glob("*_llama.py"))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """The tiny Llama and its tokenizer saved as an ordinary model folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok, seed=0).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tiny_flags(model_dir: str, out: Path, **extra: str) -> list[str]:
    """Flags that turn any recipe config into a two-step run of the tiny model (overriding the YAML)."""
    flags = {
        "model_name_or_path": model_dir, "output_dir": str(out), "max_steps": "2", "per_device_train_batch_size": "2",
        "per_device_eval_batch_size": "4", "gradient_accumulation_steps": "1", "logging_steps": "1",
        "bf16": "false", "report_to": "none", "save_strategy": "no", "eval_strategy": "no", "disable_tqdm": "true",
        "lora_r": "4", "lora_alpha": "8", **extra,
    }
    return [item for key, value in flags.items() for item in (f"--{key}", value)]


def run_recipe(method: str, argv: list[str]) -> dict:
    """Execute ``recipes/<method>_llama.py`` as ``__main__`` with ``argv``, in this process."""
    path = RECIPES / f"{method}_llama.py"
    with mock.patch.object(sys, "argv", [str(path), *argv]):
        return runpy.run_path(str(path), run_name="__main__")


def assert_valid_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 2000  # a drawn figure, not an empty file


# --- every recipe, two steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", _recipe_methods())
def test_recipe_runs_two_steps_on_the_tiny_model(method, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / method
    run_recipe(method, ["--config", str(CONFIGS / f"{method}_llama.yaml"), *tiny_flags(tiny_model_dir, out)])

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert any("loss" in e for e in state["log_history"])
    first = state["log_history"][0]  # the configs hold out data: the evaluation before training is kept at step 0
    assert first["step"] == 0 and any(k.startswith("eval_") for k in first)
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()  # LoRA: the adapter only
    assert (out / "tokenizer.json").is_file()
    assert_valid_png(out / "training_curves.png")
    card = (out / "README.md").read_text()
    assert f"- {method}" in card and "library_name: peft" in card

    # the run's own config repeats it: YAML values and command-line overrides, and nothing secret
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["max_steps"] == 2 and saved["model_name_or_path"] == tiny_model_dir and saved["use_peft"] is True
    printed = capsys.readouterr().out
    assert f"== hfrlhf {method}: done" in printed and str(out) in printed


def test_demo_config_is_the_short_lora_run_with_bf16_left_to_the_device(tiny_model_dir):
    from hfrlhf.models.loading import bf16_supported
    from hfrlhf.workflows import dpo

    script, train, model = parse_args(dpo.ARGUMENTS, ["--config", str(CONFIGS / "demo_dpo.yaml")])
    assert model.model_name_or_path == "smollm2-135m-instruct" and model.use_peft and model.lora_r == 16
    assert "bf16" not in yaml.safe_load((CONFIGS / "demo_dpo.yaml").read_text())  # auto: fast bf16 only
    assert train.bf16 == bf16_supported() and train.max_length == 256 and train.output_dir == "outputs/dpo-demo"
    assert script.dataset_name is None and script.eval_fraction > 0 and script.eval_before_train
    assert train.max_steps == -1 and train.num_train_epochs >= 1


def test_the_docs_show_the_demo_command():
    command = "python recipes/dpo_llama.py --config recipes/configs/demo_dpo.yaml"
    for path in [ROOT / "docs" / "recipes.md", ROOT / "docs" / "dpo.md", RECIPES / "dpo_llama.py"]:
        assert command in path.read_text(), path.name


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_config_parses_with_its_recipe_arguments(config):
    method = config.split("_")[0]
    if method == "demo":
        method = "dpo"
    workflow = get_workflow(method)
    script, train, model = parse_args(workflow.ARGUMENTS, ["--config", str(CONFIGS / config)])
    assert isinstance(script, ScriptArguments)
    values = yaml.safe_load((CONFIGS / config).read_text())
    assert train.output_dir == values["output_dir"]


def test_every_recipes_path_the_docs_name_exists():
    """Launch commands in the docs, recipe docstrings and config comments point at files that are there."""
    import re

    texts = [ROOT / "README.md", ROOT / "docs" / "recipes.md", *RECIPES.glob("*.py"), *CONFIGS.glob("*.yaml"),
             *(RECIPES / "accelerate").glob("*.yaml")]
    named = {m for path in texts for m in re.findall(r"recipes/[\w./-]+\.(?:py|yaml|json)", path.read_text())}
    assert "recipes/accelerate/multi_gpu.yaml" in named and "recipes/configs/dpo_llama_qlora.yaml" in named
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert missing == []


def test_no_config_forces_bf16():
    """bf16 is left to the device (auto): forced on, AVX2-only CPUs run hundreds of times slower, old GPUs fail."""
    for path in CONFIGS.glob("*.yaml"):
        assert "bf16" not in yaml.safe_load(path.read_text()), path.name


def test_every_method_has_a_recipe_a_config_and_a_docstring_with_its_launch_commands():
    for method in _recipe_methods():
        assert method in METHODS
        text = (RECIPES / f"{method}_llama.py").read_text()
        doc = text.split('"""')[1]
        assert f"python recipes/{method}_llama.py --config recipes/configs/{method}_llama.yaml" in doc
        assert f"accelerate launch recipes/{method}_llama.py --config recipes/configs/{method}_llama.yaml" in doc
        assert "--load_in_4bit" in doc or "qlora" in doc
        assert (CONFIGS / f"{method}_llama.yaml").is_file()


# --- YAML: round trip and overrides ------------------------------------------------------------------------
def test_yaml_values_are_defaults_and_flags_override_them(tmp_path):
    from hfrlhf.workflows import dpo

    config = tmp_path / "c.yaml"
    config.write_text("beta: 0.3\nlearning_rate: 5e-7\nloss_type: ipo\nlora_target_modules: q_proj\n"
                      "use_peft: true\noutput_dir: from-yaml\neval_fraction: 0.2\n")
    script, train, model = parse_args(dpo.ARGUMENTS, ["--config", str(config), "--beta", "0.5"])
    assert train.beta == 0.5  # the flag wins
    assert train.learning_rate == 5e-7  # a YAML 1.1 '5e-7' string becomes a float
    assert train.loss_type == ["ipo"] and model.lora_target_modules == ["q_proj"]  # scalars for list fields
    assert train.output_dir == "from-yaml" and script.eval_fraction == 0.2 and model.use_peft


def test_yaml_round_trip_gives_equal_arguments(tmp_path):
    from hfrlhf.workflows import dpo

    first = parse_args(dpo.ARGUMENTS, ["--config", str(CONFIGS / "dpo_llama.yaml"), "--beta", "0.25",
                                       "--lora_target_modules", "q_proj", "v_proj", "--no_eval_before_train",
                                       "--hub_token", "hf_secret_value"])
    save_yaml(tmp_path / "again.yaml", *first)
    text = (tmp_path / "again.yaml").read_text()
    assert "hf_secret_value" not in text and "hub_token" not in text
    second = parse_args(dpo.ARGUMENTS, ["--config", str(tmp_path / "again.yaml")])
    for a, b in zip(first, second):
        names = [f.name for f in dataclasses.fields(a) if f.init and f.name != "hub_token"]
        assert {n: getattr(a, n) for n in names} == {n: getattr(b, n) for n in names}
    assert to_yaml(*second) == text


def test_unknown_yaml_key_names_the_closest_argument(tmp_path):
    from hfrlhf.workflows import dpo

    config = tmp_path / "typo.yaml"
    config.write_text("bta: 0.3\n")
    with pytest.raises(ValueError, match="'bta' \\(did you mean 'beta'\\?\\)"):
        parse_args(dpo.ARGUMENTS, ["--config", str(config)])


def test_unknown_flag_is_an_error():
    from hfrlhf.workflows import dpo

    with pytest.raises(SystemExit):
        parse_args(dpo.ARGUMENTS, ["--no_such_flag", "1"])


def test_config_field_name_is_reserved():
    from dataclasses import dataclass

    @dataclass
    class Bad:
        config: str = "x"

    with pytest.raises(ValueError, match="config"):
        ArgumentParser((Bad,))


# --- launch configs ----------------------------------------------------------------------------------------
ACCELERATE = sorted((RECIPES / "accelerate").glob("*.yaml"))

# DeepSpeed's config keys (top level and zero_optimization): a typo here is silently ignored by DeepSpeed.
DS_TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "zero_optimization", "steps_per_print", "wall_clock_breakdown",
    "zero_allow_untested_optimizer", "activation_checkpointing", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "flops_profiler", "tensorboard", "memory_breakdown",
}
DS_ZERO_KEYS = {
    "stage", "allgather_partitions", "allgather_bucket_size", "overlap_comm", "reduce_scatter", "reduce_bucket_size",
    "contiguous_gradients", "offload_param", "offload_optimizer", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold",
    "sub_group_size", "stage3_gather_16bit_weights_on_model_save", "round_robin_gradients", "zero_hpz_partition_size",
    "zero_quantized_weights", "zero_quantized_gradients", "elastic_checkpoint", "ignore_unused_parameters",
    "load_from_fp32_weights", "memory_efficient_linear",
}
DS_OFFLOAD_KEYS = {"device", "pin_memory", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "ratio",
                   "fast_init", "pipeline_read", "pipeline_write"}


def _simulate_launch(config_file: Path):
    """What ``accelerate launch --config_file <file> script.py`` does before starting a process: parse,
    validate, and build the launched process's environment. Returns (args, env)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import launch as launch_utils

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "recipes/dpo_llama.py"])
    args, defaults, mp_from_config = _validate_launch_command(args)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = launch_utils.prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = launch_utils.prepare_multi_gpu_env(args)
    else:
        _, env = launch_utils.prepare_simple_launcher_cmd_env(args)
    return args, env


def test_the_five_launch_configs_exist():
    names = {p.stem for p in ACCELERATE}
    assert {"single_gpu", "multi_gpu", "fsdp", "deepspeed_zero2", "deepspeed_zero3"} <= names


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_launch_config_is_valid_for_accelerate(path, monkeypatch):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin

    config = load_config_from_file(str(path))  # unknown top-level keys and bad enums raise here
    assert isinstance(config, ClusterConfig)

    # keys inside fsdp_config / deepspeed_config become launch flags; accelerate ignores unknown ones silently
    options = {o.lstrip("-") for a in launch_command_parser()._actions for o in a.option_strings}
    choices = {o.lstrip("-"): a.choices for a in launch_command_parser()._actions for o in a.option_strings if a.choices}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key, value in (getattr(config, section) or {}).items():
            flag = key if key.startswith(prefix) else prefix + key
            assert flag in options, f"{path.name}: {section}.{key} is not an accelerate option"
            if flag in choices:
                assert str(value) in {str(c) for c in choices[flag]}, f"{path.name}: {key}={value}"

    monkeypatch.chdir(ROOT)  # DeepSpeed JSON paths are relative to the repository root, where one launches
    args, env = _simulate_launch(path)
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    if config.distributed_type == DistributedType.FSDP:
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
        assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap == ["LlamaDecoderLayer"]
    elif config.distributed_type == DistributedType.DEEPSPEED:
        plugin = DeepSpeedPlugin()
        expected = 3 if "zero3" in path.stem else 2
        assert plugin.zero_stage == expected
        assert plugin.zero3_init_flag is (expected == 3)
    elif config.distributed_type == DistributedType.MULTI_GPU:
        assert args.multi_gpu and args.num_processes > 1
    else:
        assert config.distributed_type == DistributedType.NO and args.num_processes == 1


@pytest.mark.parametrize("path", sorted((RECIPES / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_deepspeed_json_has_only_known_keys(path):
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads(path.read_text())
    assert set(config) <= DS_TOP_KEYS, set(config) - DS_TOP_KEYS
    zero = config["zero_optimization"]
    assert set(zero) <= DS_ZERO_KEYS, set(zero) - DS_ZERO_KEYS
    for block in ("offload_param", "offload_optimizer"):
        if block in zero:
            assert set(zero[block]) <= DS_OFFLOAD_KEYS
            assert zero[block]["device"] in ("none", "cpu", "nvme")
    if zero["stage"] < 3:
        assert not any(k.startswith("stage3_") for k in zero) and "offload_param" not in zero
    # "auto" values are filled from TrainingArguments by the HF integration; the plugin reads the file as is
    plugin = DeepSpeedPlugin(hf_ds_config=str(path))
    assert plugin.zero_stage == zero["stage"]
    referenced = [p for p in ACCELERATE if path.name in p.read_text()]
    assert referenced, f"no launch config uses {path.name}"


# --- the stages chain: the reward recipe's output is PPO's reward model ----------------------------------
def test_ppo_trains_against_the_reward_recipes_lora_reward_model(tiny_model_dir, tmp_path):
    if not (RECIPES / "reward_llama.py").is_file():
        pytest.skip("no reward recipe")
    reward_dir = tmp_path / "reward"
    run_recipe("reward", ["--config", str(CONFIGS / "reward_llama.yaml"), *tiny_flags(tiny_model_dir, reward_dir),
                          "--eval_fraction", "0"])
    assert (reward_dir / "adapter_config.json").is_file()

    out = tmp_path / "ppo"
    run_recipe("ppo", ["--config", str(CONFIGS / "ppo_llama.yaml"), *tiny_flags(tiny_model_dir, out),
                       "--reward_model_path", str(reward_dir), "--response_length", "8"])
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    scores = [e["objective/scores"] for e in history if "objective/scores" in e]
    assert scores and all(s == s for s in scores)


def test_ppo_reward_model_is_the_trained_one(tiny_model_dir, tmp_path):
    """A LoRA reward folder loads as base + adapter merged, score head included: same rewards as PeftModel."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from hfrlhf.models.loading import ModelArguments
    from hfrlhf.workflows.ppo import load_reward

    if not (RECIPES / "reward_llama.py").is_file():
        pytest.skip("no reward recipe")
    reward_dir = tmp_path / "reward"
    run_recipe("reward", ["--config", str(CONFIGS / "reward_llama.yaml"), *tiny_flags(tiny_model_dir, reward_dir),
                          "--eval_fraction", "0", "--learning_rate", "1e-2"])
    merged, _ = load_reward(str(reward_dir), ModelArguments(model_name_or_path=tiny_model_dir))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    base.config.pad_token_id = merged.config.pad_token_id
    reference = PeftModel.from_pretrained(base, str(reward_dir)).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        assert torch.allclose(merged.eval()(ids).logits, reference(ids).logits, atol=1e-5)


# --- logging -----------------------------------------------------------------------------------------------
def test_report_to_tensorboard_writes_event_files(tiny_model_dir, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    run_recipe("sft", ["--config", str(CONFIGS / "sft_llama.yaml"), *tiny_flags(tiny_model_dir, out),
                       "--report_to", "tensorboard", "--eval_fraction", "0"])
    assert list(out.rglob("events.out.tfevents.*"))


def test_tensorboard_is_dropped_with_a_warning_when_missing(monkeypatch, tmp_path):
    import importlib.util

    from hfrlhf.trainers.sft import SFTConfig
    from hfrlhf.workflows import steps

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    args = SFTConfig(output_dir=str(tmp_path), report_to=["tensorboard"], bf16=False)
    with pytest.warns(UserWarning, match="tensorboard"):
        steps.prepare(args)
    assert args.report_to == []


# --- QLoRA ---------------------------------------------------------------------------------------------------
def test_qlora_run_merges_into_unquantized_weights(tmp_path):
    pytest.importorskip("bitsandbytes")
    model_dir = tmp_path / "tiny64"
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok, hidden_size=64).save_pretrained(model_dir)  # 4-bit blocks need a wider layer
    tok.save_pretrained(model_dir)
    out = tmp_path / "qlora"
    run_recipe("dpo", ["--config", str(CONFIGS / "dpo_llama.yaml"), *tiny_flags(str(model_dir), out),
                       "--load_in_4bit", "--eval_fraction", "0", "--merge_adapter"])
    assert "- qlora" in (out / "README.md").read_text()
    config = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in config
    assert (out / "merged" / "model.safetensors").is_file()
