import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel

from hfrlhf.data.tokenize import tokenize_dataset
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.sft import SFTConfig, SFTTrainer, WholeSequenceCollator

ROWS = [
    {"prompt": [{"role": "user", "content": "What is the capital of France?"}],
     "completion": [{"role": "assistant", "content": "Paris."}]},
    {"prompt": [{"role": "user", "content": "Count to three."}],
     "completion": [{"role": "assistant", "content": "one two three"}]},
    {"prompt": [{"role": "user", "content": "Review the film."}],
     "completion": [{"role": "assistant", "content": "I loved it, the acting was wonderful."}]},
]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny-model runs are dominated by thread start-up and contention: one intra-op thread is fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return tokenize_dataset(Dataset.from_list(ROWS), tok, max_length=64)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=3, max_steps=1, logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return SFTConfig(**base)


def _hand_nll(model, rows, *, completion_only=True):
    """Independent path: one plain forward per record, full softmax, mean NLL over the chosen positions."""
    total, count = 0.0, 0
    for row in rows:
        ids = row["prompt_ids"] + row["completion_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        first = len(row["prompt_ids"]) if completion_only else 1
        for pos in range(first, len(ids)):
            total -= logp[pos - 1, ids[pos]].item()
            count += 1
    return total / count


def test_loss_is_the_completion_nll_and_prompt_tokens_carry_none(tmp_path, tok, data):
    model = build_tiny_llama(tok, seed=3)
    trainer = SFTTrainer(model, args=_args(tmp_path), train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([data[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_hand_nll(model, data), abs=1e-5)
    assert loss != pytest.approx(_hand_nll(model, data, completion_only=False), abs=1e-3)

    # the labels the collator emits: -100 on every prompt token (and padding), the token id on completions
    labels = batch["labels"]
    for i, row in enumerate(data):
        p, c = len(row["prompt_ids"]), len(row["completion_ids"])
        assert (labels[i, :p] == -100).all()
        assert labels[i, p:p + c].tolist() == row["completion_ids"]
        assert (labels[i, p + c:] == -100).all()


def test_prompt_tokens_get_no_gradient_signal(tmp_path, tok, data):
    """Changing a prompt token's *target* (not its input) cannot change the loss: it is never scored."""
    model = build_tiny_llama(tok, seed=3)
    trainer = SFTTrainer(model, args=_args(tmp_path), train_dataset=data, processing_class=tok)
    batch = trainer.data_collator([data[i] for i in range(3)])
    n_prompt = len(data[0]["prompt_ids"])
    scored = set(batch["target_index"].tolist())
    assert not any(t in scored for t in range(n_prompt))  # row 0, flat index = column


def test_completion_only_off_scores_every_token_but_the_first(tmp_path, tok, data):
    model = build_tiny_llama(tok, seed=3)
    trainer = SFTTrainer(model, args=_args(tmp_path, completion_only_loss=False), train_dataset=data,
                         processing_class=tok)
    assert isinstance(trainer.data_collator, WholeSequenceCollator)
    batch = trainer.data_collator([data[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_hand_nll(model, data, completion_only=False), abs=1e-5)


def test_packed_layout_gives_the_padded_loss(tmp_path, tok, data):
    model = build_tiny_llama(tok, seed=3)
    losses = []
    for layout in ("padded", "packed"):
        trainer = SFTTrainer(model, args=_args(tmp_path, layout=layout), train_dataset=data, processing_class=tok)
        batch = trainer.data_collator([data[i] for i in range(3)])
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, batch).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_packing_is_trls_name_for_the_packed_layout(tmp_path):
    assert _args(tmp_path, packing=True).layout == "packed"


def test_shared_prompt_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="shared"):
        _args(tmp_path, layout="shared_prompt")


def test_training_lowers_the_loss_with_lora_and_logs_num_tokens(tmp_path, tok):
    model = build_tiny_llama(tok, seed=3)
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    args = _args(tmp_path, max_steps=8, learning_rate=5e-2)
    trainer = SFTTrainer(model, args=args, train_dataset=ROWS, eval_dataset=ROWS, processing_class=tok,
                         peft_config=peft)
    assert isinstance(trainer.model, PeftModel)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before
    logged = [e for e in trainer.state.log_history if "num_tokens" in e]
    assert logged and all(b["num_tokens"] > a["num_tokens"] for a, b in zip(logged, logged[1:]))


def test_pairwise_data_trains_on_the_chosen_answers(tmp_path, tok):
    pairs = [{"prompt": "Hi", "chosen": " Hello!", "rejected": " Go away."}]
    trainer = SFTTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=pairs, processing_class=tok)
    row = trainer.train_dataset[0]
    assert tok.decode(row["completion_ids"]).startswith(" Hello!")


def test_prompt_only_data_is_refused_with_a_clear_message(tmp_path, tok):
    with pytest.raises(ValueError, match="sft"):
        SFTTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=[{"prompt": "Hi"}], processing_class=tok)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tok, data):
    import copy

    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    model = build_tiny_llama(tok, seed=3)
    trainer = SFTTrainer(model, args=_args(tmp_path), train_dataset=data, processing_class=no_pad)
    assert no_pad.pad_token_id == tok.eos_token_id
    batch = trainer.data_collator([data[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_hand_nll(model, data), abs=1e-5)  # padding (now EOS) is never scored
