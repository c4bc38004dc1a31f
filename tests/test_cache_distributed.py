"""TeacherCache.build under torch.distributed: two gloo processes on the CPU build the same bytes
as one process, complete a partial cache, leave a failed process's shards for a rerun (by any
number of processes), and the Distiller's DDP reading of the result is exact."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import cache_build_worker as worker
import pytest
import torch
from torchrun import run_two_processes

import pykd
from pykd import TeacherCache


def files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


def assert_same_files(path: Path, reference: Path) -> None:
    got, expected = files(path), files(reference)
    assert sorted(got) == sorted(expected)
    for name, content in expected.items():
        assert got[name] == content, name


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """The worker's folder after one two-process run, and one-process builds to compare with."""
    out = tmp_path_factory.mktemp("two")
    ref = tmp_path_factory.mktemp("one")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run: the same kernels, the same bits
    try:
        worker.build_token(ref / "token")
        worker.build_sampled(ref / "sampled", batch_size=3)  # another batching, the same draws
        worker.build_sentence(ref / "sentence")
        # A partial cache: shards 0, 1 and 2 of 5 built; shard 1 then dropped from the manifest
        # and shard 2 listed only in the part of process 3 of an earlier, killed 4-process run.
        with pytest.raises(worker.Killed):
            worker.build_token(out / "partial", on_shard=_kill_after(2))
        manifest = json.loads((out / "partial" / "manifest.json").read_text())
        assert sorted(manifest["shards"]) == ["0", "1", "2"]
        part = {**manifest, "shards": {"2": manifest["shards"].pop("2")}}
        del manifest["shards"]["1"]
        (out / "partial" / "manifest.json").write_text(json.dumps(manifest))
        (out / "partial" / "manifest.part-00003.json").write_text(json.dumps(part))
    finally:
        torch.set_num_threads(threads)
    run_two_processes(worker.__file__, str(out), cwd=tempfile.gettempdir(), timeout=240)
    ranks = [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]
    return out, ref, ranks


def _kill_after(last: int):
    def on_shard(j: int) -> None:
        if j == last:
            raise worker.Killed

    return on_shard


def test_two_processes_build_the_bytes_of_one(two):
    out, ref, ranks = two
    # Round-robin over the 5 (token) and 3 (sentence) missing shards.
    assert [r["built"]["token"] for r in ranks] == [[0, 2, 4], [1, 3]]
    assert [r["built"]["sentence"] for r in ranks] == [[0, 2], [1]]
    assert [r["built"]["sampled"] for r in ranks] == [[0, 2, 4], [1, 3]]
    for name in ("token", "sampled", "sentence"):
        assert_same_files(out / name, ref / name)  # the manifest and every shard file
        TeacherCache.open(out / name).verify()


def test_a_partial_cache_is_completed_by_two_processes(two):
    out, ref, ranks = two
    # Shards 0 and 2 (the latter from the old part) were kept; 1, 3 and 4 split between the two.
    assert [r["built"]["partial"] for r in ranks] == [[1, 4], [3]]
    assert_same_files(out / "partial", ref / "token")  # no part left behind


def test_a_failed_process_leaves_its_shards_for_a_one_process_rerun(two):
    out, ref, ranks = two
    assert ranks[1]["error"].startswith("Killed")
    assert ranks[0]["error"].startswith("CacheError: another process failed")
    killed = out / "killed"
    assert [r["built"]["killed"] for r in ranks] == [[0, 2, 4], [1]]
    # Each process's shards are in its part; the manifest lists none of them yet.
    with pytest.raises(pykd.CacheError, match="0 of 5 shards"):
        TeacherCache.open(killed).require_complete()
    assert sorted(f.name for f in killed.glob("manifest.part-*")) == [
        "manifest.part-00000.json",
        "manifest.part-00001.json",
    ]
    built = []
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "killed"
        copy.mkdir()
        for name, content in files(killed).items():
            (copy / name).write_bytes(content)
        worker.build_token(copy, on_shard=built.append)
        assert built == [3]  # only what no process finished
        assert_same_files(copy, ref / "token")


def test_ddp_training_from_a_cache_equals_one_process(two):
    out, ref, _ = two
    one = worker.train(TeacherCache.open(ref / "token"), batch_size=4)
    student = torch.load(out / "student.pt", weights_only=True)
    for key, value in one.student.state_dict().items():
        torch.testing.assert_close(student[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_distributed_true_needs_a_process_group(tmp_path):
    with pytest.raises(ValueError, match="distributed=True needs torch.distributed"):
        worker.build_token(tmp_path / "c", distributed=True)
