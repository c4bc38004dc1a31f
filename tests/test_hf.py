"""pykd.integrations.hf.DistillationTrainer on tiny random transformers models."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pykd  # noqa: E402
from pykd.integrations.hf import DistillationTrainer  # noqa: E402

NO_DROPOUT_BERT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
NO_DROPOUT_GPT2 = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


def bert_classifier(hidden, layers, seed):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3, **NO_DROPOUT_BERT)
    return transformers.BertForSequenceClassification(config)


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
