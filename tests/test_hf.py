"""pykd.integrations.hf.DistillationTrainer on tiny random transformers models."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
from torchrun import run_two_processes

transformers = pytest.importorskip("transformers")

import pykd  # noqa: E402
from pykd.integrations.hf import DistillationTrainer  # noqa: E402

NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def tiny_bert(model_class, num_labels, hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=num_labels,
        **NO_DROPOUT_BERT)
    return model_class(config)


def bert_classifier(hidden, layers, seed):
    return tiny_bert(transformers.BertForSequenceClassification, 3, hidden, layers, seed)


def gpt2_lm(hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=hidden, n_layer=layers,
                                     n_head=2, bos_token_id=0, eos_token_id=0,
                                     **NO_DROPOUT_GPT2)
    return transformers.GPT2LMHeadModel(config)


def classification_data(n=16, seq=6):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (n, seq), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def lm_data(n=4, seq=8):
    """Token-level batches with right padding (-100 labels) of different lengths."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for i in range(n):
        ids = torch.randint(0, 40, (seq,), generator=g)
        length = seq - i  # 8, 7, 6, 5 real tokens
        mask = (torch.arange(seq) < length).long()
        labels = ids.masked_fill(mask == 0, -100)
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def training_args(tmp_path, **kw):
    kw = {"per_device_train_batch_size": 4, "learning_rate": 1e-3, "report_to": [],
          "disable_tqdm": True, "save_strategy": "no", "use_cpu": True, "seed": 0, **kw}
    return transformers.TrainingArguments(output_dir=str(tmp_path), **kw)


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_train_runs_and_teacher_is_frozen(tmp_path):
    teacher, student = bert_classifier(32, 2, 0), bert_classifier(16, 1, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = classification_data()
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, temperature=2.0, alpha=0.5,
        args=training_args(tmp_path, max_steps=6, logging_steps=1, learning_rate=5e-3),
        train_dataset=data)
    assert not trainer.causal_lm
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    batch = collate(data)
    with torch.no_grad():
        first = trainer.compute_loss(student, batch).item()
    result = trainer.train()
    with torch.no_grad():
        last = trainer.compute_loss(student, batch).item()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert last < first
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_compute_loss_matches_functional_classification(tmp_path):
    teacher, student = bert_classifier(32, 2, 0), bert_classifier(16, 1, 1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, divergence="jsd",
                                  temperature=3.0, alpha=0.3, beta=0.4,
                                  args=training_args(tmp_path))
    batch = collate(classification_data(8))
    loss, outputs = trainer.compute_loss(student, batch, return_outputs=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        t = teacher(**inputs).logits
    expected = pykd.distillation_loss(
        student(**inputs).logits, t, target=batch["labels"], divergence="jsd", temperature=3.0,
        alpha=0.3, beta=0.4)
    torch.testing.assert_close(loss, expected)
    assert outputs.logits.shape == (8, 3)
    # No labels: the soft term alone (alpha = 1).
    soft = trainer.compute_loss(student, inputs)
    expected_soft = pykd.distillation_loss(student(**inputs).logits, t, divergence="jsd",
                                           temperature=3.0, beta=0.4)
    torch.testing.assert_close(soft, expected_soft)


def test_compute_loss_matches_shifted_token_loss(tmp_path):
    teacher, student = gpt2_lm(32, 2, 0), gpt2_lm(16, 1, 1)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0,
                                  alpha=0.5, args=training_args(tmp_path))
    assert trainer.causal_lm
    batch = collate(lm_data())
    loss = trainer.compute_loss(student, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = student(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    expected = pykd.distillation_loss(
        s[:, :-1].reshape(-1, 40), t[:, :-1].reshape(-1, 40),
        target=batch["labels"][:, 1:].reshape(-1), temperature=2.0, alpha=0.5)
    torch.testing.assert_close(loss, expected)
    # The count the Trainer would pass: sum-reduced over the rows, divided through weights.
    n = batch["labels"][:, 1:].ne(-100).sum()
    scaled = trainer.compute_loss(student, batch, num_items_in_batch=n)
    torch.testing.assert_close(scaled, expected)  # one micro-batch: sum / n == mean
    half = trainer.compute_loss(student, batch, num_items_in_batch=2 * n)
    torch.testing.assert_close(half, expected / 2)


def test_gradient_accumulation_normalises_by_items(tmp_path):
    """Two micro-batches with different token counts: the step's gradient is the gradient of the
    sum of the per-token losses over both, divided by their total count (not a mean of means)."""
    teacher, student = gpt2_lm(32, 2, 0), gpt2_lm(16, 1, 1)
    reference = gpt2_lm(16, 1, 1)
    data = lm_data()
    grads = {}

    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.update({n: p.grad.clone() for n, p in student.named_parameters()})

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, temperature=2.0, alpha=0.5,
        args=training_args(tmp_path, per_device_train_batch_size=2,
                           gradient_accumulation_steps=2, max_steps=1, max_grad_norm=0.0,
                           learning_rate=0.0),
        train_dataset=data, callbacks=[Capture()])
    trainer.train()
    assert grads

    batch = collate(data)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    s = reference(**inputs).logits
    with torch.no_grad():
        t = teacher(**inputs).logits
    labels = batch["labels"][:, 1:].reshape(-1)
    total = pykd.distillation_loss(
        s[:, :-1].reshape(-1, 40), t[:, :-1].reshape(-1, 40), target=labels, temperature=2.0,
        alpha=0.5, reduction="sum") / labels.ne(-100).sum()
    total.backward()
    for name, p in reference.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_import_pykd_does_not_import_transformers():
    code = "import sys, pykd, pykd.integrations; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "pykd.integrations.hf", raising=False)
    with pytest.raises(ImportError, match=r'pip install "pykd\[hf\]"'):
        importlib.import_module("pykd.integrations.hf")


def bert_tokens(hidden, layers, seed):
    return tiny_bert(transformers.BertForTokenClassification, 5, hidden, layers, seed)


def uneven_data(kind, labelled):
    """Right-padded rows of different lengths (token kinds) or 7 rows, so that the last of four
    micro-batches of 2 is smaller (sequence kind): micro-batches of unequal row counts."""
    g = torch.Generator().manual_seed(3)
    seq, vocab, n = 8, (40 if kind == "causal" else 50), (7 if kind == "sequence" else 8)
    lengths = [8, 2, 6, 3, 8, 5, 1, 7][:n]
    rows = []
    for length in lengths:
        ids = torch.randint(1, vocab, (seq,), generator=g)
        mask = (torch.arange(seq) < length).long()
        row = {"input_ids": ids, "attention_mask": mask}
        if labelled and kind == "sequence":
            row["labels"] = torch.randint(0, 3, (), generator=g)
        elif labelled:
            labels = ids if kind == "causal" else torch.randint(0, 5, (seq,), generator=g)
            row["labels"] = labels.masked_fill(mask == 0, -100)
        rows.append(row)
    return rows


MODELS = {"causal": gpt2_lm, "sequence": bert_classifier, "token": bert_tokens}


def step_gradient(out_dir, kind, labelled, batch_size, accumulation, **kw):
    """The student's gradient at the optimizer step of a one-step run over uneven_data."""
    teacher, student = MODELS[kind](32, 2, 0), MODELS[kind](16, 1, 1)
    grads = []

    class Capture(transformers.TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kw):
            grads.append(torch.cat([p.grad.reshape(-1) for p in student.parameters()]))

    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, temperature=2.0, alpha=0.5,
        args=training_args(out_dir, per_device_train_batch_size=batch_size,
                           gradient_accumulation_steps=accumulation, max_steps=1,
                           max_grad_norm=0.0, learning_rate=0.0, **kw),
        train_dataset=uneven_data(kind, labelled), callbacks=[Capture()])
    trainer.train()
    assert len(grads) == 1
    return grads[0]


def relative_error(got, expected):
    return ((got - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "no_labels"])
@pytest.mark.parametrize("kind", ["causal", "sequence", "token"])
def test_accumulated_step_equals_one_big_step(tmp_path, kind, labelled):
    """Four micro-batches with different numbers of loss rows give the gradient of one step on
    their concatenation, with or without labels, for token- and sequence-level outputs."""
    whole = step_gradient(tmp_path, kind, labelled, len(uneven_data(kind, labelled)), 1)
    accumulated = step_gradient(tmp_path, kind, labelled, 2, 4)
    assert relative_error(accumulated, whole) < 1e-5


def test_two_processes_equal_one_step_on_their_batches(tmp_path):
    """2 processes x 2 micro-batches of 2 uneven rows: after DDP's average of the gradients, one
    step on all 8 rows (the count is summed over the processes, the loss scaled back by 2)."""
    out = tmp_path / "grads.pt"
    run_two_processes(__file__, str(out), cwd=str(tmp_path), timeout=240)
    two = torch.load(out, weights_only=True)
    for labelled in (True, False):
        whole = step_gradient(tmp_path, "causal", labelled, 8, 1)
        assert relative_error(two[labelled], whole) < 1e-5, f"labelled={labelled}"


def test_evaluate_scores_the_rows_it_counts(tmp_path):
    """Recent transformers count an evaluation batch (for its num_items_in_batch) through a
    hook that the trainer overrides: the count must be that of the rows the loss scores."""
    teacher, student = gpt2_lm(32, 2, 0), gpt2_lm(16, 1, 1)
    data = uneven_data("causal", labelled=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0,
                                  alpha=0.5, args=training_args(tmp_path,
                                                                per_device_eval_batch_size=8))
    metrics = trainer.evaluate(eval_dataset=data)
    with torch.no_grad():
        expected = trainer.compute_loss(student, collate(data))  # the mean over its rows
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-5)


if __name__ == "__main__":
    # The multi-process half of test_two_processes_equal_one_step_on_their_batches, run by
    # `torchrun --nproc_per_node 2 test_hf.py OUT`: rank 0 saves the step's gradients to OUT.
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        grads = {labelled: step_gradient(folder, "causal", labelled, 2, 2, ddp_backend="gloo",
                                         ddp_timeout=60)
                 for labelled in (True, False)}
    if os.environ["RANK"] == "0":
        torch.save(grads, sys.argv[1])


def test_soft_only_rows_as_in_the_distiller(tmp_path):
    teacher, student = bert_classifier(32, 2, 0), bert_classifier(16, 1, 1)
    batch = collate(classification_data(8))
    batch["labels"][[1, 2, 6]] = -1  # transfer rows: no label
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0,
                                  alpha=0.3, soft_index=-1, args=training_args(tmp_path))
    loss = trainer.compute_loss(student, batch)
    distiller = pykd.Distiller(teacher, student, temperature=2.0, alpha=0.3, soft_index=-1,
                               progress=False)
    assert loss.item() == pytest.approx(distiller.evaluate([batch])["loss"], rel=1e-5)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        expected = pykd.distillation_loss(student(**inputs).logits, teacher(**inputs).logits,
                                          target=batch["labels"], soft_index=-1,
                                          temperature=2.0, alpha=0.3)
    torch.testing.assert_close(loss.detach(), expected)
    with pytest.raises(ValueError, match="soft_index must be a negative int"):
        DistillationTrainer(model=student, teacher_model=teacher, soft_index=-100,
                            args=training_args(tmp_path))
