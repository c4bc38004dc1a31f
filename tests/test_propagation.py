"""pykd.MutualDistiller (deep mutual learning, online one-way KD) and pykd.propagate (chains)."""

from __future__ import annotations

import copy

import pytest
import torch
from distiller_models import Kill, Killed, TinyLM, TokenDataset, token_batch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import pykd


def classification(n: int, dim: int = 8, classes: int = 4, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator), torch.randint(0, classes, (n,),
                                                                 generator=generator)


def sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


# ------------------------------------------------------------------------- mutual learning


@pytest.mark.parametrize("n_models", [2, 3])
def test_each_model_learns_from_labels_and_its_detached_peers(n_models):
    """One SGD step equals, per model k, the op's mean loss against the peers' (mixed) detached
    logits with alpha_k, over a step of two accumulated micro-batches."""
    x, y = classification(12)
    models = [nn.Linear(8, 4) for _ in range(n_models)]
    copies = [nn.Linear(8, 4) for _ in range(n_models)]
    for m, c in zip(models, copies):
        c.load_state_dict(m.state_dict())
    alphas, lrs = [0.2, 0.5, 0.9][:n_models], [0.5, 0.3, 0.1][:n_models]
    distiller = pykd.MutualDistiller(models, alpha=alphas, temperature=2.0, accumulation_steps=2,
                                     optimizer=[torch.optim.SGD(m.parameters(), lr=lr)
                                                for m, lr in zip(models, lrs)],
                                     log_every=1, progress=False)
    steps = []
    distiller.callbacks.append(type("R", (pykd.Callback,), {
        "on_step_end": lambda self, d, step, metrics: steps.append(metrics)})())
    distiller.fit([(x[:5], y[:5]), (x[5:], y[5:])], epochs=1)

    logits = [c(x) for c in copies]
    total = 0.0
    for k, (reference, alpha, lr) in enumerate(zip(copies, alphas, lrs)):
        peers = [z.detach() for j, z in enumerate(logits) if j != k]
        teacher = peers[0] if len(peers) == 1 else pykd.combine_teachers(
            peers, [1 / len(peers)] * len(peers), temperature=2.0)
        loss = pykd.distillation_loss(logits[k], teacher, target=y, alpha=alpha,
                                      temperature=2.0)
        grads = torch.autograd.grad(loss, list(reference.parameters()))
        with torch.no_grad():
            for p, g in zip(reference.parameters(), grads):
                p -= lr * g
        total += loss.item()
        assert steps[0][f"loss/{k}"] == pytest.approx(loss.item(), rel=1e-5)
        assert steps[0][f"alpha/{k}"] == alpha
    assert steps[0]["loss"] == pytest.approx(total, rel=1e-5)
    for model, reference in zip(models, copies):
        torch.testing.assert_close(model.weight, reference.weight, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bias, reference.bias, rtol=1e-5, atol=1e-6)


def test_one_way_online_distillation_is_alpha_zero_for_the_teacher():
    """alpha=[0, a]: the teacher trains exactly as it would on the labels alone."""
    x, y = classification(32)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)
    torch.manual_seed(0)
    teacher, student = nn.Linear(8, 4), nn.Linear(8, 4)
    alone = nn.Linear(8, 4)
    alone.load_state_dict(teacher.state_dict())
    before = student.weight.detach().clone()
    pykd.MutualDistiller([teacher, student], alpha=[0.0, 0.7], optimizer=sgd(0.2),
                         progress=False).fit(loader, epochs=2)
    # The reference: the same batches, the teacher's cross entropy only.
    reference = pykd.MutualDistiller([alone, nn.Linear(8, 4)], alpha=[0.0, 0.0],
                                     optimizer=sgd(0.2), progress=False)
    reference.fit(loader, epochs=2)
    torch.testing.assert_close(teacher.weight, alone.weight, rtol=1e-6, atol=1e-7)
    assert not torch.equal(student.weight, before)


def test_mutual_learning_beats_labels_alone():
    """Two MLPs on 200 samples with 40% wrong labels: learning from each other's tempered
    predictions (alpha 0.95, T 4) lifts both clean test accuracies by about 9 points over
    training each on the labels alone (about 0.57 -> 0.66)."""
    torch.manual_seed(0)
    dim, classes, n = 16, 4, 200
    truth = torch.randn(dim, classes)
    x = torch.randn(n, dim)
    y = (x @ truth).argmax(-1)
    noisy = torch.where(torch.rand(n) < 0.4, torch.randint(0, classes, (n,)), y)
    x_test = torch.randn(2000, dim)
    y_test = (x_test @ truth).argmax(-1)
    loader = DataLoader(TensorDataset(x, noisy), batch_size=20, shuffle=True)

    def accuracies(alpha, temperature):
        torch.manual_seed(100)
        models = [nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, classes))
                  for _ in range(2)]
        pykd.MutualDistiller(models, alpha=alpha, temperature=temperature, lr=1e-2,
                             progress=False).fit(loader, epochs=50)
        with torch.no_grad():
            return [(m(x_test).argmax(-1) == y_test).float().mean().item() for m in models]

    alone, mutual = accuracies(0.0, 1.0), accuracies(0.95, 4.0)
    for a, m in zip(alone, mutual):
        assert m > a + 0.04, (alone, mutual)


def _mutual_run(path, callbacks=(), resume=False):
    torch.manual_seed(0)
    models = [TinyLM(width=6, dropout=0.2), TinyLM(width=8, dropout=0.2)]
    distiller = pykd.MutualDistiller(
        models, alpha=[0.3, 0.6], temperature=2.0, accumulation_steps=2, lr=[0.02, 0.01],
        scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
        checkpoint_path=path, checkpoint_every=2, callbacks=list(callbacks), seed=3,
        causal_lm=True, progress=False,
    )
    loader = DataLoader(TokenDataset(12, seed=2), batch_size=3, shuffle=True)
    distiller.fit(loader, epochs=2, resume_from=path if resume else None)
    return distiller


def test_mutual_resume_after_a_kill_matches_an_uninterrupted_run(tmp_path):
    """Checkpoints hold every model, optimizer and scheduler (token level, causal LM)."""
    full = _mutual_run(tmp_path / "full.pt")
    with pytest.raises(Killed):
        _mutual_run(tmp_path / "killed.pt", callbacks=[Kill(at=3)])
    torch.manual_seed(123)
    resumed = _mutual_run(tmp_path / "killed.pt", resume=True)
    assert resumed.global_step == full.global_step == 4
    for a, b in zip(resumed.models, full.models):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    metrics = resumed.evaluate(DataLoader(TokenDataset(6, seed=5), batch_size=3))
    assert {"loss", "loss/0", "loss/1", "accuracy/0", "agreement/1", "kl/0"} <= metrics.keys()
    with pytest.raises(ValueError, match="format"):
        pykd.Distiller(TinyLM(), TinyLM(), progress=False).load_checkpoint(tmp_path / "full.pt")


def test_mutual_options_are_checked():
    with pytest.raises(ValueError, match="at least two"):
        pykd.MutualDistiller([TinyLM()])
    with pytest.raises(TypeError, match="hidden"):
        pykd.MutualDistiller([TinyLM(), TinyLM()], hidden=pykd.HiddenMatch({1: 1}))
    with pytest.raises(ValueError, match="3 values of alpha for 2 models"):
        pykd.MutualDistiller([TinyLM(), TinyLM()], alpha=[0.1, 0.2, 0.3])
    models = [TinyLM(), TinyLM()]
    with pytest.raises(TypeError, match="one optimizer cannot serve"):
        pykd.MutualDistiller(models, optimizer=torch.optim.SGD(models[0].parameters(), lr=0.1))
    unlabelled = {k: v for k, v in token_batch(2, 4, torch.Generator()).items() if k != "labels"}
    with pytest.raises(ValueError, match="needs labels"):
        pykd.MutualDistiller(models, progress=False).fit([unlabelled], epochs=1)


# -------------------------------------------------------------------------------- chains


def test_propagate_distils_down_a_three_model_chain():
    torch.manual_seed(0)
    teacher = TinyLM(width=16, depth=3)
    assistant, student = TinyLM(width=8, depth=2), TinyLM(width=4, depth=1)
    train = DataLoader(TokenDataset(24, seed=1), batch_size=4, shuffle=True)
    valid = DataLoader(TokenDataset(8, seed=2), batch_size=4)
    # On copies: a Distiller freezes its teacher, and the assistant is still to be trained.
    before = pykd.Distiller(copy.deepcopy(assistant), copy.deepcopy(student),
                            progress=False).evaluate(valid)["kl"]
    results = pykd.propagate([teacher, assistant, student], train, epochs=3, eval_loader=valid,
                             temperature=2.0, alpha=0.7, lr=3e-2, progress=False,
                             link_options=[{"lr": 5e-2}, {}])
    assert [r["link"] for r in results] == [0, 1]
    for r in results:
        assert {"loss", "kl", "agreement", "accuracy", "ce"} <= r.keys()
    # The student learnt from the trained assistant; the assistant is frozen now, the
    # student still trainable.
    assert results[1]["kl"] < before
    assert not any(p.requires_grad for p in assistant.parameters())
    assert all(p.requires_grad for p in student.parameters())
    with pytest.raises(TypeError, match="factory"):
        pykd.propagate([teacher, assistant, student], train,
                       optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="1 link_options for 2 links"):
        pykd.propagate([teacher, assistant, student], train, link_options=[{}])
