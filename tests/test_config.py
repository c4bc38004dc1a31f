"""TrainingConfig and DistillationConfig: every option declared once, taken flat or as configs."""

import dataclasses
import inspect

import pytest
import torch

import pykd


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g))
            for _ in range(3)]


def test_configs_and_flat_keywords_train_the_same_student():
    flat = pykd.Distiller(*_models(), temperature=2.0, alpha=0.3, lr=1e-2, seed=4,
                          accumulation_steps=3, progress=False)
    boxed = pykd.Distiller(
        *_models(),
        distillation=pykd.DistillationConfig(temperature=2.0, alpha=0.3),
        training=pykd.TrainingConfig(lr=1e-2, seed=4, accumulation_steps=3, progress=False),
    )
    flat.fit(_data(), epochs=2)
    boxed.fit(_data(), epochs=2)
    for a, b in zip(flat.student.parameters(), boxed.student.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert boxed.config == flat.config
    assert boxed.objective.config == flat.objective.config


def test_keywords_are_laid_over_a_config():
    base = pykd.TrainingConfig(lr=1e-2, seed=4, progress=False)
    distiller = pykd.Distiller(*_models(), training=base, seed=9, temperature=3.0)
    assert (distiller.config.lr, distiller.config.seed, distiller.seed) == (1e-2, 9, 9)
    assert distiller.objective.config.temperature == 3.0
    assert base.seed == 4  # the caller's config is not changed


def test_unknown_keyword_and_wrong_config_type_are_refused():
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'"):
        pykd.Distiller(*_models(), temprature=2.0)
    with pytest.raises(TypeError, match="expected a TrainingConfig, got DistillationConfig"):
        pykd.Distiller(*_models(), training=pykd.DistillationConfig())
    with pytest.raises(TypeError, match="MutualDistiller does not take hidden, teacher_weights"):
        pykd.MutualDistiller(list(_models()), teacher_weights=[1.0], hidden=None)


@pytest.mark.parametrize(("kind", "options", "message"), [
    (pykd.TrainingConfig, {"accumulation_steps": 0}, "accumulation_steps must be an int >= 1"),
    (pykd.TrainingConfig, {"accumulation_steps": 1.5}, "accumulation_steps must be an int"),
    (pykd.TrainingConfig, {"max_grad_norm": 0.0}, "max_grad_norm must be a number > 0"),
    (pykd.TrainingConfig, {"precision": "fp8"}, "precision must be one of"),
    (pykd.TrainingConfig, {"checkpoint_every": 0}, "checkpoint_every must be >= 1"),
    (pykd.TrainingConfig, {"metrics_path": "m.jsonl", "log_every": 0}, "log_every >= 1"),
    (pykd.DistillationConfig, {"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    (pykd.DistillationConfig, {"sample_weighting": "loud"}, "sample_weighting must be one of"),
    (pykd.DistillationConfig, {"incorrect_weight": -1.0}, "incorrect_weight must be >= 0"),
    (pykd.DistillationConfig, {"lm_head_chunk_size": 0}, "lm_head_chunk_size must be"),
])
def test_configs_check_their_values_when_made_and_replaced(kind, options, message):
    with pytest.raises(ValueError, match=message):
        kind(**options)
    with pytest.raises(ValueError, match=message):
        kind().replace(**options)


def test_signature_spells_out_every_option_once():
    params = inspect.signature(pykd.Distiller).parameters
    fields = [f.name for kind in (pykd.DistillationConfig, pykd.TrainingConfig)
              for f in dataclasses.fields(kind)]
    assert list(params) == ["teacher", "student", "distillation", "training", *fields]
    assert params["temperature"].default == 1.0 and params["lr"].default == 1e-4
    assert not set(pykd.DistillationConfig.names()) & set(pykd.TrainingConfig.names())


def test_mutual_distiller_takes_a_training_config_and_per_model_rates():
    models = list(_models())
    mutual = pykd.MutualDistiller(models, lr=[1e-3, 1e-2],
                                  training=pykd.TrainingConfig(seed=3, progress=False))
    assert mutual.seed == 3
    assert [opt.param_groups[0]["lr"] for opt in mutual.optimizers] == [1e-3, 1e-2]
