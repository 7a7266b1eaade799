"""KTOTrainer: the loss from plain forwards, TRL 1.16 on the same inputs, KL pairs, edge cases, LoRA, 4-bit."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import unpaired_chat as _chat
from peft import LoraConfig

from hfrlhf.data.tokenize import tokenize_dataset
from hfrlhf.losses.kto import apo_zero_unpaired_loss, kto_loss
from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
from hfrlhf.trainers.kto import KL_COLUMN, KTOCollator, KTOConfig, KTOTrainer, add_kl_partners

ROWS = [
    _chat("Review the film.", "I loved it, wonderful acting.", True),
    _chat("What is the capital of France?", "The capital of France is a terrible question.", False),
    _chat("Count to three.", "one two three", True),
    _chat("Say something kind.", "I hated every minute.", False),
]
PAIRS = [
    {"prompt": "The food was", "chosen": " good and the staff were kind.", "rejected": " cold."},
    {"prompt": "The film was", "chosen": " wonderful.", "rejected": " boring and far too long."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def data(tok):
    return tokenize_dataset(Dataset.from_list(ROWS), tok, max_length=64)


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                per_device_train_batch_size=4, max_steps=1, logging_steps=1, disable_tqdm=True, seed=0)
    base.update(kw)
    return KTOConfig(**base)


def _seq_logp(model, prompt_ids, completion_ids) -> float:
    """Independent path: one plain forward per sequence, full softmax, sum over completion tokens."""
    ids = torch.tensor([list(prompt_ids) + list(completion_ids)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    p = len(prompt_ids)
    return sum(logp[p - 1 + j, t].item() for j, t in enumerate(completion_ids))


def _rows(ds, n=None):
    return [ds[i] for i in range(n or len(ds))]


# --- the loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_loss_equals_loss_function_on_plain_forwards(tmp_path, tok, data, loss_type):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    kw = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.8, loss_type=loss_type)
    trainer = KTOTrainer(policy, ref_model=ref, args=_args(tmp_path, **kw), train_dataset=data, processing_class=tok)
    rows = _rows(trainer.train_dataset)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()

    # prompts are distinct, so the batch keeps its order: KL pair i is prompt i with completion i + 1
    b = len(rows)
    pol = torch.tensor([_seq_logp(policy, r["prompt_ids"], r["completion_ids"]) for r in rows])
    refs = torch.tensor([_seq_logp(ref, r["prompt_ids"], r["completion_ids"]) for r in rows])
    labels = torch.tensor([r["label"] for r in rows])
    hyper = dict(beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)
    if loss_type == "kto":
        kl_pol = [_seq_logp(policy, rows[i]["prompt_ids"], rows[(i + 1) % b]["completion_ids"]) for i in range(b)]
        kl_ref = [_seq_logp(ref, rows[i]["prompt_ids"], rows[(i + 1) % b]["completion_ids"]) for i in range(b)]
        z0 = max(0.0, sum(p - r for p, r in zip(kl_pol, kl_ref)) / b)
        expected = kto_loss(pol, refs, labels, kl=torch.tensor(z0, dtype=torch.float64), **hyper).loss.item()
    else:
        expected = apo_zero_unpaired_loss(pol, refs, labels, **hyper).loss.item()
    assert loss == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("layout, per_row", [("packed", None), ("shared_prompt", None), ("shared_prompt", 256)])
def test_layouts_give_the_padded_loss(tmp_path, tok, data, layout, per_row):
    # per_row: shared prompts packed several to a row (max_tokens_per_row)
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    losses = {}
    for lay, cap in (("padded", None), (layout, per_row)):
        trainer = KTOTrainer(policy, ref_model=ref, args=_args(tmp_path, layout=lay, beta=0.5, max_tokens_per_row=cap),
                             train_dataset=data, processing_class=tok)
        batch = trainer.data_collator(_rows(trainer.train_dataset))
        if cap is not None:  # several sequences share a row
            assert batch["input_ids"].shape[0] < batch["last_index"].shape[0]
        with torch.no_grad():
            losses[lay] = trainer.compute_loss(trainer.model, batch).item()
    assert losses[layout] == pytest.approx(losses["padded"], abs=1e-5)


def test_kl_pairs_take_no_gradient(tmp_path, tok, data):
    # The padded layout runs the KL half without grad; the gradient must equal that of one joint forward
    # (shared_prompt) where the KL half is detached.
    grads = {}
    for lay in ("padded", "shared_prompt"):
        policy = build_tiny_llama(tok, seed=1)
        trainer = KTOTrainer(policy, ref_model=build_tiny_llama(tok, seed=2), args=_args(tmp_path, layout=lay, beta=2.0),
                             train_dataset=data, processing_class=tok)
        trainer.compute_loss(trainer.model, trainer.data_collator(_rows(trainer.train_dataset))).backward()
        grads[lay] = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    torch.testing.assert_close(grads["padded"], grads["shared_prompt"], atol=1e-6, rtol=1e-4)


def _trl_loss(tmp_path, tok, policy, ref, features, **kw) -> float:
    from trl import KTOConfig as TRLConfig
    from trl import KTOTrainer as TRLTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    trl_args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to=[], bf16=False, use_cpu=True,
                         gradient_checkpointing=False, per_device_train_batch_size=len(features), max_length=None, **kw)
    trl = TRLTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=trl_args,
                     train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "completion", "label")}
                                                      for r in ROWS]), processing_class=tok)
    batch = DataCollatorForUnpairedPreference(pad_token_id=tok.pad_token_id)(features)
    trl.model.eval()
    with torch.no_grad():
        return trl.compute_loss(trl.model, batch).item()


@pytest.mark.parametrize("loss_type, beta, w_d, w_u", [("kto", 0.2, 1.0, 1.0), ("kto", 1.5, 1.3, 0.7),
                                                       ("apo_zero_unpaired", 0.5, 1.0, 2.0)])
def test_same_loss_as_trl_kto_trainer_on_the_same_batch(tmp_path, tok, data, loss_type, beta, w_d, w_u):
    """TRL's KTOTrainer run for real (its collator, its fused log-probs, its reference) on identical inputs.

    TRL pairs row i with completion i - 1 (rotation at dataset level); our in-batch pairs take completion
    i + 1. Fed in reverse order our batch holds exactly TRL's pairs, and the loss is a mean over rows, so the
    two must agree. The fixed per-row partner path is checked on the same pairs too.

    Tolerance: each sequence's log-prob is a fp32 sum of 10-26 token log-probs (about -150 in total), and
    ``ops.logprobs`` adds them one by one (``index_add``) where TRL sums pairwise, so the two sums differ by
    up to ~8e-6 (measured against fp64). Through the loss that is up to 2e-6 here (beta=0.5, weight 2);
    the other cases agree within 1e-6.
    """
    policy, ref = build_tiny_llama(tok, seed=3), build_tiny_llama(tok, seed=4)
    rows = [{k: data[i][k] for k in ("prompt_ids", "completion_ids", "label")} for i in range(len(data))]
    shifted = [rows[i - 1]["completion_ids"] for i in range(len(rows))]
    trl_features = [{**r, "KL_completion_ids": kl} for r, kl in zip(rows, shifted)]
    kw = dict(loss_type=loss_type, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    theirs = _trl_loss(tmp_path, tok, policy, ref, trl_features, **kw)

    ours = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=_args(tmp_path, **kw),
                      train_dataset=data, processing_class=tok)
    ours.model.eval()
    row_collator = KTOCollator(tok.pad_token_id, kl_source="row", kl_pairs=ours.uses_kl)
    with torch.no_grad():
        in_batch = ours.compute_loss(ours.model, ours.data_collator(rows[::-1])).item()
        per_row = ours.compute_loss(ours.model, row_collator([{**r, KL_COLUMN: kl} for r, kl in zip(rows, shifted)])).item()
    assert in_batch == pytest.approx(theirs, abs=3e-6)
    assert per_row == pytest.approx(theirs, abs=3e-6)


# --- mismatched pairs ----------------------------------------------------------------------------------------


def test_kl_pairs_are_mismatched_for_unpaired_pairwise_data(tok):
    feats = [{"prompt_ids": [5, 6], "completion_ids": [7, 2], "label": True},
             {"prompt_ids": [5, 6], "completion_ids": [8, 2], "label": False},
             {"prompt_ids": [9], "completion_ids": [10, 2], "label": True},
             {"prompt_ids": [9], "completion_ids": [11, 2], "label": False}]
    batch = KTOCollator(0)(feats)
    ids = batch["input_ids"].tolist()
    for i in range(4):  # sequence 4 + i is row i's prompt followed by a completion of another prompt
        f = next(f for f in feats if ids[i][: len(f["prompt_ids"] + f["completion_ids"])] == f["prompt_ids"] + f["completion_ids"])
        prompt = f["prompt_ids"]
        assert ids[4 + i][: len(prompt)] == prompt
        rest = ids[4 + i][len(prompt):]
        for g in feats:
            if g["prompt_ids"] == prompt:
                assert rest[: len(g["completion_ids"])] != g["completion_ids"], (i, ids)
    assert sorted(batch["labels"].tolist()) == [False, False, True, True]


def test_fixed_partners_are_deterministic_and_mismatched():
    ds = Dataset.from_dict({"prompt_ids": [[1], [1], [2], [2], [3]], "completion_ids": [[10], [11], [12], [13], [14]],
                            "label": [True, False, True, False, True]})
    a, b = add_kl_partners(ds, seed=3), add_kl_partners(ds, seed=3)
    assert a[KL_COLUMN] == b[KL_COLUMN] and a._fingerprint == b._fingerprint
    by_prompt = {1: {(10,), (11,)}, 2: {(12,), (13,)}, 3: {(14,)}}
    for row in a:
        assert tuple(row[KL_COLUMN]) not in by_prompt[row["prompt_ids"][0]]
    short = add_kl_partners(Dataset.from_dict({"prompt_ids": [[1, 1, 1], [2]], "completion_ids": [[5], [6, 6, 6, 6]],
                                               "label": [True, False]}), max_length=5)
    assert short[0][KL_COLUMN] == [6, 6]  # cut so that prompt + partner fits max_length


# --- TRL users' traps: single-kind batches, batch size 1, several processes --------------------------------------


def test_single_label_batch_gives_finite_loss_gradients_and_metrics(tmp_path, tok, data):
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), args=_args(tmp_path),
                         train_dataset=data, processing_class=tok)
    trainer.model.train()  # metrics go to the "train" logs
    desirable = [r for r in _rows(trainer.train_dataset) if r["label"]]
    loss, out = trainer.compute_loss(trainer.model, trainer.data_collator(desirable), return_outputs=True)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert out["metrics"]["count/rejected"].item() == 0
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert "rewards/rejected" not in logged and "rewards/margins" not in logged
    assert logged["count/chosen"] == 2 and logged["count/rejected"] == 0
    assert all(math.isfinite(v) for v in logged.values())


def test_only_desirable_dataset_trains_and_warns(tmp_path, tok):
    rows = [r for r in ROWS if r["label"]]
    with pytest.warns(UserWarning, match="only desirable"):
        trainer = KTOTrainer(build_tiny_llama(tok, seed=1), args=_args(tmp_path, max_steps=2, per_device_train_batch_size=2),
                             train_dataset=rows, processing_class=tok)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for h in logs:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float))
        assert "rewards/rejected" not in h and "rewards/chosen" in h


def test_batch_size_one_uses_a_real_mismatched_pair(tmp_path, tok, data):
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2),
                         args=_args(tmp_path, per_device_train_batch_size=1, max_steps=4, learning_rate=1e-2),
                         train_dataset=data, processing_class=tok)
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    assert batch["last_index"].shape[0] == 2
    kl_seq = batch["input_ids"][1, : len(row["prompt_ids"]) + len(row[KL_COLUMN])].tolist()
    assert kl_seq == row["prompt_ids"] + row[KL_COLUMN] and row[KL_COLUMN] != row["completion_ids"]
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    assert all(math.isfinite(h["loss"]) and math.isfinite(h["kl"]) for h in logs)


def test_loss_touches_every_parameter_when_a_kind_is_missing(tmp_path, tok, data):
    # What keeps DDP from hanging: each process's backward reaches the same parameters whatever its labels.
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), args=_args(tmp_path),
                         train_dataset=data, processing_class=tok)
    undesirable = [r for r in _rows(trainer.train_dataset) if not r["label"]]
    trainer.compute_loss(trainer.model, trainer.data_collator(undesirable)).backward()
    assert all(p.grad is not None for p in trainer.model.parameters() if p.requires_grad)


def test_metrics_are_summed_then_divided_over_micro_batches(tmp_path, tok, data):
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), args=_args(tmp_path),
                         train_dataset=data, processing_class=tok)
    trainer.model.train()  # metrics go to the "train" logs
    rows = _rows(trainer.train_dataset)
    totals: dict[str, float] = {}
    kls = []
    for part in (rows[:1] + rows[2:], rows[1:2] + rows[:1]):  # 1 rejected of 3, then 1 rejected of 2
        with torch.no_grad():
            _, out = trainer.compute_loss(trainer.model, trainer.data_collator(part), return_outputs=True)
        for k, v in out["metrics"].items():
            totals[k] = totals.get(k, 0.0) + v.item()
        kls.append(out["metrics"]["kl"].item())
    trainer.log({})
    logged = trainer.state.log_history[-1]
    assert logged["count/chosen"] == 3 and logged["count/rejected"] == 2
    assert logged["rewards/chosen"] == pytest.approx(totals["rewards/chosen"] / 3, abs=1e-6)
    assert logged["rewards/rejected"] == pytest.approx(totals["rewards/rejected"] / 2, abs=1e-6)
    assert logged["logps/rejected"] == pytest.approx(totals["logps/rejected"] / 2, abs=1e-5)
    assert logged["rewards/margins"] == pytest.approx(logged["rewards/chosen"] - logged["rewards/rejected"], abs=1e-6)
    assert logged["kl"] == pytest.approx(sum(kls) / 2, abs=1e-6)


_DDP_SCRIPT = textwrap.dedent('''
    import json, pathlib, sys, weakref, torch
    from hfrlhf.models.tiny import build_tiny_llama, build_tiny_tokenizer
    from hfrlhf.trainers.kto import KTOConfig, KTOTrainer

    class Recording(KTOTrainer):
        seen, kls = [], []
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, out = super().compute_loss(model, inputs, return_outputs=True)
            self.seen.append(inputs["labels"].tolist())
            self.kls.append(out["metrics"]["kl"].item())
            return (loss, out) if return_outputs else loss

    tok = build_tiny_tokenizer()
    # sequential batches of 2 dealt to 2 processes: process 0 gets rows 0-1, 4-5; process 1 gets rows 2-3, 6-7
    labels = [True, False, True, True, False, True, True, True]
    rows = [{"prompt": f"Question {i}: say something.", "completion": f" Answer number {i}.", "label": lab}
            for i, lab in enumerate(labels)]
    args = KTOConfig(output_dir=sys.argv[1], report_to=[], save_strategy="no", bf16=False, use_cpu=True,
                     per_device_train_batch_size=2, max_steps=2, logging_steps=1, disable_tqdm=True,
                     train_sampling_strategy="sequential", learning_rate=1e-2, beta=0.5, seed=0)
    trainer = Recording(build_tiny_llama(tok, seed=1), ref_model=build_tiny_llama(tok, seed=2), args=args,
                        train_dataset=rows, processing_class=tok)
    trainer.train()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    rank = trainer.accelerator.process_index
    kls = trainer.accelerator.gather(torch.tensor(trainer.kls)[None])
    params = trainer.accelerator.gather(flat[None])
    # one file per process: two processes printing to one stdout can interleave their lines
    out = pathlib.Path(sys.argv[1])
    if rank == 0:
        (out / "result.json").write_text(json.dumps({
            "kl_same": bool((kls[0] == kls[1]).all()),
            "params_same": bool(torch.equal(params[0], params[1])),
            "logs": [h for h in trainer.state.log_history if "loss" in h],
        }))
    (out / f"seen{rank}.json").write_text(json.dumps(trainer.seen))
    wrapper = weakref.ref(trainer.model_wrapped)
    wrapped_kind = type(trainer.model_wrapped).__name__
    trainer.end_training()  # frees the DDP wrapper, then destroys the process group
    (out / f"ended{rank}.json").write_text(json.dumps({"wrapper": wrapped_kind, "freed": wrapper() is None,
                                                         "group_alive": torch.distributed.is_initialized()}))
''')


@pytest.mark.multiprocess
def test_two_processes_one_without_undesirable_examples(tmp_path):
    script = tmp_path / "ddp_kto.py"
    script.write_text(_DDP_SCRIPT)
    # as the other torchrun tests: no distributed or accelerate settings inherited from the session, the
    # rendezvous port chosen by torchrun itself (a port probed here could be taken by another process before
    # torchrun binds it), and room for two processes starting on a loaded machine
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path / "out")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    out = tmp_path / "out"
    seen = {rank: json.loads((out / f"seen{rank}.json").read_text()) for rank in (0, 1)}
    result = json.loads((out / "result.json").read_text())
    assert seen[1] == [[True, True], [True, True]]  # process 1 never saw an undesirable example
    assert any(False in step for step in seen[0])
    assert result["kl_same"] and result["params_same"]
    assert len(result["logs"]) == 2
    for h in result["logs"]:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float))
        assert h["count/chosen"] + h["count/rejected"] == 4
    # end_training freed the DDP wrapper before destroying the process group (a live wrapper's reducer at the
    # group's shutdown can abort the exit)
    for rank in (0, 1):
        ended = json.loads((out / f"ended{rank}.json").read_text())
        assert ended == {"wrapper": "DistributedDataParallel", "freed": True, "group_alive": False}


# --- data ----------------------------------------------------------------------------------------------------


def test_pairwise_data_is_unpaired(tmp_path, tok):
    trainer = KTOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=PAIRS, processing_class=tok)
    ds = trainer.train_dataset
    assert len(ds) == 4 and ds["label"] == [True, False, True, False]
    assert tok.decode(ds[0]["completion_ids"]) == PAIRS[0]["chosen"] + tok.eos_token
    assert tok.decode(ds[3]["completion_ids"]) == PAIRS[1]["rejected"] + tok.eos_token
    tokenized = tokenize_dataset(Dataset.from_list(PAIRS), tok, max_length=64)
    again = KTOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=tokenized, processing_class=tok)
    assert again.train_dataset["completion_ids"] == ds["completion_ids"]
    assert again.train_dataset["label"] == ds["label"]


def test_unpaired_jsonl_file_loads(tmp_path, tok):
    from hfrlhf.data.formats import EXAMPLES_DIR

    trainer = KTOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=str(EXAMPLES_DIR / "unpaired.jsonl"),
                         processing_class=tok)
    assert {"prompt_ids", "completion_ids", "label", KL_COLUMN} <= set(trainer.train_dataset.column_names)


def test_imbalance_warning_gives_the_paper_range(tmp_path, tok):
    rows = [ROWS[0]] + [ROWS[1], ROWS[3], {**ROWS[2], "label": False}]
    with pytest.warns(UserWarning, match=r"desirable_weight in \[3, 4\]"):
        KTOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=rows, processing_class=tok)


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ValueError, match="unknown kto loss_type"):
        _args(tmp_path, loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta"):
        _args(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="weight"):
        _args(tmp_path, undesirable_weight=-1.0)


# --- reference ------------------------------------------------------------------------------------------------


def test_precomputed_reference_is_cached_and_matches(tmp_path, tok, data, monkeypatch):
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    cache = tmp_path / "cache"
    pre = KTOTrainer(copy.deepcopy(policy), args=_args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(cache)),
                     ref_model=copy.deepcopy(ref), train_dataset=data, processing_class=tok)
    assert len(list(cache.glob("*.safetensors"))) == 1
    assert all(len(v) == 2 for v in pre.train_dataset["ref_logps"])  # completion and its KL partner
    rows = _rows(pre.train_dataset)
    live = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=_args(tmp_path), train_dataset=data,
                      processing_class=tok)
    plain = [{k: v for k, v in r.items() if k != "ref_logps"} for r in rows]
    with torch.no_grad():
        l_pre = pre.compute_loss(pre.model, pre.data_collator(rows)).item()
        l_live = live.compute_loss(live.model, KTOCollator(tok.pad_token_id, kl_source="row")(plain)).item()
    assert l_pre == pytest.approx(l_live, abs=1e-5)

    import hfrlhf.trainers.reference as reference

    def refuse(*a, **k):
        raise AssertionError("the reference model should not run when the cache exists")

    monkeypatch.setattr(reference, "batch_logprobs", refuse)
    again = KTOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref),
                       args=_args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(cache)),
                       train_dataset=data, processing_class=tok)
    assert again.train_dataset["ref_logps"] == pre.train_dataset["ref_logps"]


def test_precompute_without_reference_model_uses_the_initial_policy(tmp_path, tok, data):
    args = _args(tmp_path, precompute_ref_log_probs=True, ref_cache_dir=str(tmp_path / "c"), max_steps=2)
    trainer = KTOTrainer(build_tiny_llama(tok, seed=1), args=args, train_dataset=data, processing_class=tok)
    assert trainer.ref_model is None and not trainer.reference.needs_model
    with torch.no_grad():  # the policy is its own reference before training: every log-ratio is 0
        _, out = trainer.compute_loss(trainer.model, trainer.data_collator(_rows(trainer.train_dataset)), return_outputs=True)
    assert out["metrics"]["rewards/chosen"].abs().item() < 1e-5 and out["metrics"]["kl"].item() < 1e-5
    trainer.train()


def _log_ratios(trainer, batch):
    """(log-ratios, labels, reference log-probs) of the batch's completions, computed as in training."""
    from hfrlhf.ops.logprobs import batch_logprobs

    with torch.no_grad(), trainer.autocast_smart_context_manager():
        b = batch["labels"].shape[0]
        pol = batch_logprobs(trainer.model, batch).seq_logps[:b]
        ref = trainer.reference.seq_logps(trainer.model, batch)[:b]
    return pol - ref, batch["labels"], ref


def _assert_lora_moves_the_right_way(trainer, batch):
    # bitsandbytes repacks 4-bit weights for its CPU kernel on first use, so frozen weights are compared
    # through what they compute (the adapter-off reference) as well as tensor by tensor where they are plain
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
              if "lora_" not in n and type(p) is torch.nn.Parameter}
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    ratios, labels, ref_before = _log_ratios(trainer, batch)
    assert torch.allclose(ratios, torch.zeros_like(ratios), atol=1e-4)  # LoRA starts as the identity
    trainer.train()
    ratios, labels, ref_after = _log_ratios(trainer, batch)
    assert (ratios[labels] > 0).all(), ratios
    assert (ratios[~labels] < 0).all(), ratios
    assert any(not torch.equal(p.detach(), lora[n]) for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert not any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)
    for name, p in trainer.model.named_parameters():
        if name in frozen:
            assert torch.equal(p.detach(), frozen[name]), name
    torch.testing.assert_close(ref_after, ref_before, atol=0, rtol=0)


def test_lora_trains_only_the_adapter_and_moves_log_ratios_apart(tmp_path, tok, data):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    args = _args(tmp_path, max_steps=6, learning_rate=2e-2, beta=0.5)
    trainer = KTOTrainer(build_tiny_llama(tok, seed=7), args=args, train_dataset=data, processing_class=tok,
                         peft_config=lora)
    assert trainer.ref_model is None and trainer.reference.use_adapter_off
    _assert_lora_moves_the_right_way(trainer, trainer.data_collator(_rows(trainer.train_dataset)))


# --- the bundled SmolLM2 -----------------------------------------------------------------------------------------

SMOL_ROWS = [  # plain text: a third of the tokens of the chat form (SmolLM2's template adds a system prompt)
    {"prompt": "Write one sentence about the sea.", "completion": " The sea glitters under the morning sun.",
     "label": True},
    {"prompt": "Give me a tip for sleeping well.", "completion": " Whatever, sleep is overrated.", "label": False},
    {"prompt": "Describe a cat in a few words.", "completion": " A soft, curious and playful companion.",
     "label": True},
    {"prompt": "What is two plus two?", "completion": " Two plus two is seven.", "label": False},
]


def _smol_trainer(tmp_path, model, tok, **kw):
    # fp32: at these small shapes bf16 autocast is slower than fp32 on a CPU without AMX
    args = _args(tmp_path, max_steps=2, learning_rate=3e-3, beta=0.5, max_length=64, **kw)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    return KTOTrainer(model, args=args, train_dataset=SMOL_ROWS, processing_class=tok, peft_config=lora)


@pytest.mark.slow
def test_smollm2_lora(tmp_path):
    from hfrlhf.models.loading import load_bundled

    model, tok = load_bundled()
    trainer = _smol_trainer(tmp_path, model, tok)
    _assert_lora_moves_the_right_way(trainer, trainer.data_collator(_rows(trainer.train_dataset)))


@pytest.mark.slow
def test_smollm2_4bit_lora(tmp_path):
    from hfrlhf.models.loading import ModelArguments, load_causal_lm, load_tokenizer

    model = load_causal_lm(ModelArguments(load_in_4bit=True, use_peft=True))
    tok = load_tokenizer()
    trainer = _smol_trainer(tmp_path, model, tok)
    _assert_lora_moves_the_right_way(trainer, trainer.data_collator(_rows(trainer.train_dataset)))


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tok, data):
    no_pad = copy.deepcopy(tok)
    no_pad.pad_token = None
    other = copy.deepcopy(tok)
    other.pad_token = other.convert_ids_to_tokens(0)
    assert other.pad_token_id != tok.eos_token_id
    policy, ref = build_tiny_llama(tok, seed=1), build_tiny_llama(tok, seed=2)
    losses = []
    for tokenizer in (no_pad, other):
        trainer = KTOTrainer(policy, ref_model=ref, args=_args(tmp_path), train_dataset=data,
                             processing_class=tokenizer)
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, trainer.data_collator(_rows(trainer.train_dataset))).item())
    assert no_pad.pad_token_id == tok.eos_token_id
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)  # padding is never scored, whatever token it is


def test_text_rows_are_refused_naming_the_trainer_that_takes_them(tmp_path, tok):
    with pytest.raises(ValueError, match=r"got text data .*language-modeling rows .* only SFTTrainer \(hfrlhf sft\)"):
        KTOTrainer(build_tiny_llama(tok), args=_args(tmp_path), train_dataset=[{"text": "Hello there."}],
                   processing_class=tok)
