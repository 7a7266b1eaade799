"""The ``hfrlhf`` command dispatches to the same workflows as the recipes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hfrlhf import cli
from hfrlhf.data.errors import DataError
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.workflows import METHODS, get_workflow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def _available() -> list[str]:
    """Methods whose trainer is importable here."""
    out = []
    for method in METHODS:
        try:
            get_workflow(method)
        except ImportError:
            continue
        out.append(method)
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model runs are dominated by thread start-up and contention: one intra-op thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_help_lists_every_method(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for method in METHODS:
        assert f"  {method}" in out


def test_no_arguments_prints_usage_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: hfrlhf <method>" in capsys.readouterr().out


def test_unknown_method_suggests_the_closest(capsys):
    assert cli.main(["dop", "--config", "x.yaml"]) == 2
    assert "did you mean 'dpo'" in capsys.readouterr().err


def test_version(capsys):
    from hfrlhf import __version__

    assert cli.main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


@pytest.mark.parametrize("method", _available())
def test_method_dispatches_to_its_workflow_with_config_and_overrides(method, monkeypatch):
    workflow = get_workflow(method)
    seen = {}
    monkeypatch.setattr(workflow, "run", lambda *args: seen.setdefault("args", args))
    config = CONFIGS / f"{method}_llama.yaml"
    assert cli.main([method, "--config", str(config), "--learning_rate", "3e-4", "--output_dir", "elsewhere"]) == 0
    script_args, training_args, model_args = seen["args"]
    assert [type(a) for a in seen["args"]] == list(workflow.ARGUMENTS)
    assert training_args.learning_rate == 3e-4 and training_args.output_dir == "elsewhere"  # flags win
    values = yaml.safe_load(config.read_text())
    assert model_args.model_name_or_path == values["model_name_or_path"]  # the rest comes from the YAML
    assert model_args.use_peft is values.get("use_peft", False)


def test_method_help_lists_its_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["dpo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: hfrlhf dpo" in out
    for flag in ("--config", "--beta", "--use_peft", "--dataset_name", "--merge_adapter", "--push_to_hub"):
        assert flag in out


def test_cli_trains_like_the_recipe(tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "out"
    code = cli.main(["sft", "--config", str(CONFIGS / "sft_llama.yaml"), "--model_name_or_path", str(model_dir),
                     "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                     "--bf16", "false", "--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4",
                     "--eval_fraction", "0", "--logging_steps", "1"])
    assert code == 0
    assert (out / "adapter_model.safetensors").is_file() and (out / "training_curves.png").is_file()
    assert "== hfrlhf sft: done" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny")
    tok = build_tiny_tokenizer()
    build_tiny_llama(tok).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def _pairs_file(path, bad_row=None, value=None):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(8)]
    if bad_row is not None:
        rows[bad_row].update(value)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dpo_argv(tiny_dir, tmp_path, data, *extra):
    return ["dpo", "--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir",
            str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "2", "--bf16", "false",
            "--report_to", "none", "--disable_tqdm", "true", "--lora_r", "4", "--logging_steps", "1",
            "--save_strategy", "no", *extra]


@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_a_prompt_too_long_names_the_row_of_the_data_file_after_the_held_out_split(tiny_dir, tmp_path, method):
    """Row 5 of the file (its prompt alone is over max_length) is row 5 in the error, although the held-out
    split shuffles the training rows and KTO unpairs them."""
    data = _pairs_file(tmp_path / "pairs.jsonl", 5, {"prompt": "word " * 40})
    argv = _dpo_argv(tiny_dir, tmp_path, data, "--eval_fraction", "0.25", "--max_length", "32")
    with pytest.raises(DataError) as err:
        cli.main([method, *argv[1:]])
    assert (err.value.source, err.value.row, err.value.field) == (str(data), 5, "prompt")


def test_drop_invalid_rows_drops_the_bad_rows_of_the_data_file(tiny_dir, tmp_path, caplog):
    data = _pairs_file(tmp_path / "pairs.jsonl", 3, {"chosen": None})
    with pytest.raises(DataError, match="row 3 \\(line 4\\), field 'chosen'"):
        cli.main(_dpo_argv(tiny_dir, tmp_path, data, "--eval_fraction", "0"))
    with caplog.at_level("WARNING", logger="hfrlhf"):
        assert cli.main(_dpo_argv(tiny_dir, tmp_path, data, "--eval_fraction", "0", "--drop_invalid_rows", "true")) == 0
    assert "kept 7 of 8 rows (pairwise), dropped 1: 1 x chosen: null value" in caplog.text


def test_sft_trains_on_a_file_of_text_rows_with_held_out_rows(tiny_dir, tmp_path, capsys):
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": f" The quick brown fox number {i}."}) + "\n" for i in range(8)))
    argv = _dpo_argv(tiny_dir, tmp_path, data, "--eval_fraction", "0.25", "--max_length", "12")
    assert cli.main(["sft", *argv[1:]]) == 0
    assert "== hfrlhf sft: done" in capsys.readouterr().out
    with pytest.raises(DataError, match=r"got text data .* only SFTTrainer \(hfrlhf sft\)"):
        cli.main(argv)  # dpo


def test_console_module_runs_in_a_fresh_process():
    result = subprocess.run([sys.executable, "-m", "hfrlhf.cli", "--help"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 0 and "hfrlhf <method>" in result.stdout
