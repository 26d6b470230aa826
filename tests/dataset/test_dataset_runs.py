"""``captum-graph attribute`` on one process and under torchrun (2 CPU processes, gloo), killed and resumed.

30 generated images of mixed sizes and eight formats in nested folders, one
broken file and one text file; the tiny model ``tiny_model.py:factory`` at
16x16. Every run has one intra-op thread (torchrun's default for several
processes, and set here for the in-process run), and the shards and batches do
not depend on the number of processes, so the results are compared bit for bit.

Starting Python with torch costs seconds on two cores, so the reference run is
made in this process (through the same ``main()``) and only the torchrun runs
are subprocesses.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
from PIL import Image  # noqa: E402

from captum_graph import cli  # noqa: E402
from captum_graph.dataset import open_attributions  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
MODEL = str(Path(__file__).with_name("tiny_model.py")) + ":factory"
METHODS = ("lrp", "gradcam", "ixg")
FORMATS = ("png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp")
FOLDERS = ("", "a", "a/b", "c/d/e")
IMAGES = 30
BATCH = 4  # 31 files -> 8 shards of 4, the last of 3: the shards do not divide among 2 processes evenly
TIMEOUT_S = 240


def make_images(root: Path) -> List[str]:
    keys = []
    for i in range(IMAGES):
        width, height = 12 + (i * 7) % 29, 12 + (i * 11) % 23
        pixels = bytes((x * (i + 3) + y * 5 + c * 70) % 256 for y in range(height) for x in range(width) for c in range(3))
        key = "/".join(part for part in (FOLDERS[i % len(FOLDERS)], f"img{i:02d}.{FORMATS[i % len(FORMATS)]}") if part)
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        Image.frombytes("RGB", (width, height), pixels).save(root / key)
        keys.append(key)
    (root / "a" / "broken.jpg").write_bytes(b"not an image")
    (root / "notes.txt").write_text("not an image either")
    return sorted(keys)


def attribute_args(data: Path, out: Path, *extra: str) -> List[str]:
    return ["attribute", MODEL, "--data", str(data), "--method", ",".join(METHODS), "--out", str(out),
            "--size", "16", "--batch-size", str(BATCH), *extra]


def torchrun(args: List[str], delay: float = 0.0) -> subprocess.Popen:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    env["CAPTUM_GRAPH_TEST_DELAY"] = str(delay)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "captum_graph", *args]
    return subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = process.communicate(timeout=TIMEOUT_S)
    assert process.returncode == 0, f"torchrun failed ({process.returncode}):\n{out}\n{err[-4000:]}"
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def child_pids(parent: int) -> List[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(entry))
    return found


def kill_run(process: subprocess.Popen) -> None:
    """SIGKILL torchrun's workers (each leads its own process group) and torchrun itself: a node lost."""
    for worker in child_pids(process.pid):
        try:
            os.killpg(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate(timeout=TIMEOUT_S)


def shard_records(out: Path) -> Dict[int, dict]:
    return {int(path.stem): json.loads(path.read_text()) for path in (out / "shards").glob("*.json")}


def rank_logs(out: Path, run: str) -> List[dict]:
    return [json.loads(path.read_text()) for path in sorted((out / "runs" / run).glob("rank*.json"))]


def assert_same_attributions(expected: Path, actual: Path) -> None:
    for method in METHODS:
        ours, theirs = open_attributions(str(expected), method), open_attributions(str(actual), method)
        assert list(ours) == list(theirs), method
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype and np.array_equal(ours[key], theirs[key]), (
                f"{method} {key}: not bit for bit equal, max difference {np.abs(ours[key] - theirs[key]).max()}"
            )


def kill_after_first_shard(process: subprocess.Popen, out: Path, outcome: dict) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ((out / "shards").is_dir() and shard_records(out)):
        if process.poll() is not None or time.monotonic() > deadline:
            outcome["error"] = "the run to kill ended, or wrote no shard in time"
            return
        time.sleep(0.05)
    kill_run(process)
    outcome["records"] = shard_records(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The image folder, the reference run (in this process) and the torchrun runs, overlapped where they can be."""
    root = tmp_path_factory.mktemp("dataset")
    data = root / "images"
    keys = make_images(data)
    killed, outcome = torchrun(attribute_args(data, root / "killed"), delay=0.5), {}
    watcher = threading.Thread(target=kill_after_first_shard, args=(killed, root / "killed", outcome))
    watcher.start()
    two = torchrun(attribute_args(data, root / "two", "--evaluate"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(attribute_args(data, root / "reference", "--evaluate")) == 0
    finally:
        torch.set_num_threads(threads)
    watcher.join(TIMEOUT_S)
    assert "records" in outcome, outcome.get("error")
    resumed = torchrun(attribute_args(data, root / "killed", "--resume"))
    return {
        "root": root, "keys": keys, "two": finish(two), "resumed": finish(resumed), "before_resume": outcome["records"]
    }


def test_two_processes_equal_one_bit_for_bit(runs):
    root = runs["root"]
    assert_same_attributions(root / "reference", root / "two")
    assert list(open_attributions(str(root / "two"), "lrp")) == runs["keys"]  # relative paths, in sorted order
    reference = json.loads((root / "reference" / "evaluation.json").read_text())
    two = json.loads((root / "two" / "evaluation.json").read_text())
    assert set(two["aopc"]) == set(METHODS) and two["examples"] == IMAGES
    assert two == reference  # the AOPC per method, the random order and the mean curves: bit for bit
    assert "Pixel flipping on 30 images" in runs["two"].stdout


def test_each_image_is_done_once_by_one_process(runs):
    out = runs["root"] / "two"
    records = shard_records(out)
    assert sorted(records) == list(range(8))
    stored = [key for record in records.values() for key in record["keys"]]
    assert sorted(stored) == runs["keys"]  # every image once: none twice, none padded in
    run = {record["run"] for record in records.values()}
    assert len(run) == 1
    logs = rank_logs(out, run.pop())
    assert [log["rank"] for log in logs] == [0, 1] and all(log["world_size"] == 2 for log in logs)
    done = [shard for log in logs for shard in log["shards"]]
    assert sorted(done) == list(range(8)) and all(log["shards"] for log in logs)  # each shard by one process
    for log in logs:
        assert all(records[shard]["rank"] == log["rank"] for shard in log["shards"])
    assert "with 2 processes" in runs["two"].stdout


def test_an_unreadable_file_is_skipped_and_listed(runs):
    for name in ("reference", "two"):
        index = json.loads((runs["root"] / name / "index.json").read_text())
        assert [entry["key"] for entry in index["failed"]] == ["a/broken.jpg"], name
        assert "cannot identify image file" in index["failed"][0]["error"]
        assert index["complete"] and index["stored"] == IMAGES
        assert "a/broken.jpg" not in open_attributions(str(runs["root"] / name), "ixg")
    assert "Could not read 1 file" in runs["two"].stdout and "a/broken.jpg" in runs["two"].stdout
    assert "Ignored 1 file without an image ending: notes.txt" in runs["two"].stdout


def test_a_killed_run_resumes_to_the_uninterrupted_result(runs):
    root = runs["root"]
    before = runs["before_resume"]
    assert 1 <= len(before) < 8, f"{len(before)} shards were done when the run was killed"
    assert_same_attributions(root / "reference", root / "killed")
    after = shard_records(root / "killed")
    assert sorted(after) == list(range(8))
    assert all(after[shard] == record for shard, record in before.items())  # done shards were not redone
    new_runs = {record["run"] for shard, record in after.items() if shard not in before}
    assert len(new_runs) == 1
    redone = [shard for log in rank_logs(root / "killed", new_runs.pop()) for shard in log["shards"]]
    assert sorted(redone) == sorted(set(range(8)) - set(before))
    assert not [path for path in (root / "killed").rglob("*") if ".tmp-" in path.name]
    assert f"resumed: {len(before)} shards were done before" in runs["resumed"].stdout


def test_the_evaluate_command_reads_the_run_settings(runs, capsys):
    reference = runs["root"] / "reference"
    first = json.loads((reference / "evaluation.json").read_text())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["evaluate", str(reference), "--batch-size", "3"]) == 0  # model, data, preprocessing from run.json
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "Pixel flipping on 30 images" in out and "random order" in out
    again = json.loads((reference / "evaluation.json").read_text())
    assert again["aopc"] == pytest.approx(first["aopc"], rel=1e-6) and set(again["aopc"]) == set(METHODS)
