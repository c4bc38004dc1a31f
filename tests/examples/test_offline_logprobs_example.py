"""examples/offline_logprobs.py: a tiny run end to end, and the loss its cache gives checked
against a float64 reference computed from the engine's dumped log-probabilities."""

import json
import math

import torch
from reference import logprob_bucket_kl

import pykd

TINY = ["--vocab", "60", "--windows", "24", "--length", "8", "--top-k", "5", "--epochs", "2",
        "--engine-steps", "10", "--batch-size", "8", "--no-progress"]


def test_tiny_run_trains_from_the_imported_dump(load_example, tmp_path):
    ex = load_example("offline_logprobs")
    results = ex.main([*TINY, "--temperature", "2.0", "--output", str(tmp_path)])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["held_out"].keys() == {"labels only", "distilled"}
    for row in (saved["held_out_before"], *saved["held_out"].values()):
        assert math.isfinite(row["kl"]) and math.isfinite(row["ce"])
    # 5 (fp16 value, 2-byte id) pairs and the rest per position, a third of the JSON dump.
    assert 22 <= saved["cache_bytes_per_position"] < 30
    assert saved["dump_bytes_per_position"] > 2 * saved["cache_bytes_per_position"]
    assert results["held_out"] == saved["held_out"]

    # The cache's loss on a student's logits equals the float64 bucket KL built from the dump.
    cache = pykd.TeacherCache.open(tmp_path / "cache")
    assert (cache.signal, cache.top_k, cache.temperature) == ("topk+rest", 5, 2.0)
    lines = [json.loads(x) for x in (tmp_path / "engine-logprobs.jsonl").read_text().split("\n")
             if x]
    assert len(lines) == cache.num_samples == 24
    student = torch.randn(24, 8, 60, dtype=torch.float64)
    values, indices, log_rest = cache.lookup(torch.arange(24), torch.ones(24, 8, dtype=bool),
                                             rest=True)
    got = pykd.distillation_loss_topk(student, indices, values.double(), temperature=2.0,
                                      teacher_log_rest=log_rest.double(), reduction="none")
    want = torch.stack([logprob_bucket_kl(student[i], torch.tensor(line["token_ids"]),
                                          torch.tensor(line["logprobs"]), 2.0)
                        for i, line in enumerate(lines)])
    # The cache holds float16 values and rests: ~1e-3 relative.
    torch.testing.assert_close(got, want, rtol=5e-3, atol=5e-3)
    cache.close()
