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


# ------------------------------------------------------------------------------------------- language modeling

TEXTS = [{"text": " The quick brown fox jumps over the lazy dog."},
         {"text": " I really loved this film, the acting was wonderful."},
         {"text": " one two three"}]


def _hand_causal_lm_nll(model, tok, texts):
    """Independent path: the text's own ids (no special tokens) plus EOS, one plain forward each, full softmax,
    mean NLL of every token given the ones before it (all tokens but the first)."""
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total += nll.item()
        count += len(ids) - 1
    return total / count


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_text_rows_loss_is_the_causal_lm_nll_of_the_whole_text(tmp_path, tok, completion_only_loss):
    model = build_tiny_llama(tok, seed=3)
    trainer = SFTTrainer(model, args=_args(tmp_path, completion_only_loss=completion_only_loss),
                         train_dataset=TEXTS, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch).item()
    assert loss == pytest.approx(_hand_causal_lm_nll(model, tok, [r["text"] for r in TEXTS]), abs=1e-5)


def test_text_rows_train_and_the_loss_decreases(tmp_path, tok):
    model = build_tiny_llama(tok, seed=3)
    args = _args(tmp_path, max_steps=8, learning_rate=5e-3)
    trainer = SFTTrainer(model, args=args, train_dataset=TEXTS, eval_dataset=TEXTS, processing_class=tok)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.5
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < losses[0]


def test_text_rows_are_cut_to_max_length(tmp_path, tok):
    trainer = SFTTrainer(build_tiny_llama(tok), args=_args(tmp_path, max_length=5), train_dataset=TEXTS,
                         processing_class=tok)
    rows = trainer.train_dataset
    assert all(len(r["prompt_ids"]) + len(r["completion_ids"]) <= 5 for r in rows)
    first = tok(TEXTS[0]["text"], add_special_tokens=False).input_ids
    assert rows[0]["prompt_ids"] + rows[0]["completion_ids"] == first[:5] and rows[0]["truncated"]


def test_text_jsonl_file_trains_and_mixed_rows_are_refused(tmp_path, tok):
    import json

    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TEXTS), encoding="utf-8")
    trainer = SFTTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=str(path), processing_class=tok)
    assert len(trainer.train_dataset) == 3 and trainer.train().global_step == 1
    mixed = [{"prompt": "Hi", "completion": " there"}, *TEXTS]
    with pytest.raises(ValueError, match=r"row 1, field 'text': expected a row of the 'sft' schema .* got a "
                                         r"language-modeling row"):
        SFTTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=mixed, processing_class=tok)
