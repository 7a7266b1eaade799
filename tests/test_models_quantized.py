"""4-bit layers stay trainable and savable after an eval-mode forward (bitsandbytes' CPU inference layout).

On CPUs with AVX512-BF16, bitsandbytes switches a 4-bit weight to an inference layout at its first eval-mode
forward without gradients; that layout has no backward and a save leaves its scales scrambled. These tests run
everywhere; the last one needs such a CPU, since elsewhere the switch never happens.
"""

import warnings

import pytest
import torch

from hfrlhf.models.loading import ModelArguments, load_reward_model, load_tokenizer
from hfrlhf.models.quantized import keep_4bit_weights_trainable

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.slow

TEXTS = ["I loved this film, truly wonderful.", "Terrible, boring and far too long for what it was."]


def _cpu_relayouts() -> bool:
    try:
        from bitsandbytes.functional import has_avx512bf16
    except ImportError:
        return False
    return bool(has_avx512bf16())


@pytest.fixture(scope="module")
def inputs():
    tok = load_tokenizer(ModelArguments().model_name_or_path)
    return tok(TEXTS, return_tensors="pt", padding=True)


def _load(seed=0):
    torch.manual_seed(seed)  # the score head is new and random
    return load_reward_model(ModelArguments(use_peft=True, load_in_4bit=True)).eval()


def _scores(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits.float()


def _layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def test_loaded_4bit_model_is_unchanged_by_eval_forwards_and_saves(inputs):
    model = _load()
    layers = _layers(model)
    assert len(layers) == 30 * 7  # every linear layer of the 30 decoder blocks
    first = _scores(model, inputs)
    model.state_dict()  # what every checkpoint save does
    second = _scores(model, inputs)
    torch.testing.assert_close(second, first, atol=0, rtol=0)
    fresh = _load()
    torch.testing.assert_close(_scores(fresh, inputs), first, atol=0, rtol=0)


def test_gradient_reaches_the_input_of_a_4bit_layer_after_an_eval_forward():
    model = _load()
    layer = _layers(model)[3]
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        layer(x)  # eval mode, no gradient: where bitsandbytes would switch layouts
    layer.train()
    x.requires_grad_(True)
    layer(x).pow(2).sum().backward()
    assert x.grad is not None
    # the same gradient by hand: d/dx sum((x W^T)^2) = 2 (x W^T) W, with W the dequantized weight
    w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.float32)
    y = x.detach() @ w.T
    expected = 2 * y @ w
    assert (x.grad.float() - expected).norm() / expected.norm() < 0.02  # bf16 compute on CPUs with bf16 units


@pytest.mark.skipif(not _cpu_relayouts(), reason="bitsandbytes re-lays out 4-bit weights only on AVX512-BF16 CPUs")
def test_a_model_relaid_out_before_reaching_the_library_is_restored(inputs):
    model = _load()
    expected = _scores(model, inputs)
    for layer in _layers(model):
        layer.support_avx512bf16_for_cpu = True  # as a model loaded without the library's loaders
    relaid = _scores(model, inputs)
    assert all(layer.weight.quant_state.packing_format_for_cpu for layer in _layers(model))
    model.state_dict()  # a save right after: the scales are left in the inference layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert keep_4bit_weights_trainable(model) == 30 * 7
    assert any("restored for training" in str(w.message) for w in caught)
    restored = _scores(model, inputs)
    assert not any(getattr(layer.weight.quant_state, "packing_format_for_cpu", False) for layer in _layers(model))
    # back to the standard layout: the scores match the never-switched model up to the bf16 rounding of the scales
    # that the switch made, and are no longer the switched model's
    torch.testing.assert_close(restored, expected, atol=0.05, rtol=0.0)
    assert not torch.equal(restored, relaid)


def test_trainers_keep_4bit_models_loaded_elsewhere_trainable(tmp_path):
    """A 4-bit model loaded with plain ``from_pretrained`` (bitsandbytes' CPU re-layout on) is switched off by the
    trainer that receives it, policy and reward model alike."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from hfrlhf import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer
    from hfrlhf.models.bundled import bundled_model_path
    from hfrlhf.models.loading import get_peft_config, get_quantization_config

    margs = ModelArguments(use_peft=True, load_in_4bit=True, lora_r=4, lora_alpha=8)
    tok = load_tokenizer(margs.model_name_or_path)
    quant = get_quantization_config(margs)
    pairs = Dataset.from_list([{"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "No."}])
    common = dict(max_steps=1, report_to=[], save_strategy="no", use_cpu=True, per_device_train_batch_size=1)

    policy = AutoModelForCausalLM.from_pretrained(str(bundled_model_path()), quantization_config=quant)
    assert all(layer.support_avx512bf16_for_cpu == _cpu_relayouts() for layer in _layers(policy))
    DPOTrainer(policy, args=DPOConfig(output_dir=str(tmp_path / "dpo"), **common), train_dataset=pairs,
               processing_class=tok, peft_config=get_peft_config(margs))
    assert _layers(policy) and not any(layer.support_avx512bf16_for_cpu for layer in _layers(policy))

    scorer = AutoModelForSequenceClassification.from_pretrained(str(bundled_model_path()), quantization_config=quant,
                                                                num_labels=1)
    scorer.config.pad_token_id = tok.pad_token_id
    RewardTrainer(scorer, args=RewardConfig(output_dir=str(tmp_path / "rm"), **common), train_dataset=pairs,
                  processing_class=tok, peft_config=get_peft_config(margs, task_type="SEQ_CLS"))
    assert _layers(scorer) and not any(layer.support_avx512bf16_for_cpu for layer in _layers(scorer))
