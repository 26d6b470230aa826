"""``captum_graph.dataset`` in one process: what is written, targets, resuming, the reader, evaluation.

The multi-process behaviour (torchrun, kill and resume) is in ``test_dataset_runs.py``.
"""
import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from captum.attr import InputXGradient

from captum_graph import cli
from captum_graph.attr import LRP
from captum_graph.dataset import (
    FROM_DATASET,
    DatasetRunError,
    Explainers,
    ImageFiles,
    attribute_dataset,
    evaluate_dataset,
    open_attributions,
    process_group,
)
from captum_graph.perturbation import aopc, pixel_flipping

MODEL = str(Path(__file__).with_name("tiny_model.py")) + ":factory"


def build(device=torch.device("cpu")):
    return cli.load_model(MODEL).to(device)


def lrp_and_ixg(device):
    model = build(device)
    return {"lrp": LRP(model), "ixg": InputXGradient(model)}


class Examples(torch.utils.data.Dataset):
    """``(image, label)`` pairs; the items in ``broken`` raise ``error`` when read."""

    def __init__(self, count=10, broken=(), error=OSError, size=8):
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(count, 3, size, size, generator=generator)
        self.labels = torch.arange(count) % 5
        self.broken, self.error = set(broken), error

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        if index in self.broken:
            raise self.error(f"example {index} is broken")
        return self.images[index], self.labels[index]


def test_results_equal_a_plain_loop_over_the_same_batches(tmp_path):
    data = Examples(10)
    summary = attribute_dataset(lrp_and_ixg, data, str(tmp_path), batch_size=3, target=FROM_DATASET)
    assert summary.complete and summary.stored == 10 and summary.shards_now == 4 and not summary.failed
    assert summary.methods == ("lrp", "ixg") and summary.world_size == 1
    model = build()
    lrp = open_attributions(str(tmp_path), "lrp")
    assert list(lrp) == [str(i) for i in range(10)]
    for start in range(0, 10, 3):
        images, labels = data.images[start : start + 3], data.labels[start : start + 3]
        expected = LRP(model).attribute(images.clone().requires_grad_(), target=labels).detach().numpy()
        for row, key in enumerate(range(start, start + len(images))):
            assert np.array_equal(lrp[str(key)], expected[row])  # bit for bit: the same batch through the same code
    assert lrp.targets == {str(i): int(data.labels[i]) for i in range(10)}
    for method in ("lrp", "ixg"):
        files = sorted(os.listdir(tmp_path / method))
        assert files == [f"{i:08d}.npy" for i in range(4)]
        assert np.load(tmp_path / method / files[-1]).shape == (1, 3, 8, 8)  # 10 = 3 + 3 + 3 + 1: no padding


@pytest.mark.parametrize("target, expected", [(2, lambda logits: torch.full((len(logits),), 2)), (lambda logits: logits.argmin(1), lambda logits: logits.argmin(1))])
def test_a_class_index_or_a_function_of_the_output_as_target(tmp_path, target, expected):
    data = Examples(4)
    attribute_dataset(lrp_and_ixg, data, str(tmp_path), batch_size=4, target=target)
    with torch.no_grad():
        wanted = expected(build()(data.images)).tolist()
    assert list(open_attributions(str(tmp_path), "ixg").targets.values()) == wanted


def test_targets_that_cannot_be_had_are_refused(tmp_path):
    with pytest.raises(DatasetRunError, match="needs dataset items of the form"):
        attribute_dataset(lrp_and_ixg, [torch.randn(3, 8, 8)] * 2, str(tmp_path / "a"), target=FROM_DATASET)
    plain = lambda device: {"ixg": lambda inputs, targets: inputs * 2}  # noqa: E731  (no model to read the output of)
    with pytest.raises(DatasetRunError, match="return captum_graph.dataset.Explainers"):
        attribute_dataset(plain, Examples(2), str(tmp_path / "b"), target=lambda logits: logits.argmax(1))
    explained = lambda device: Explainers(build(device), {"double": lambda inputs, targets: inputs * 2})  # noqa: E731
    summary = attribute_dataset(explained, Examples(2), str(tmp_path / "c"), target=lambda logits: logits.argmax(1))
    assert summary.stored == 2


@pytest.mark.parametrize("name", ["shards", "a/b", "", ".hidden"])
def test_method_names_must_name_a_folder(tmp_path, name):
    with pytest.raises(DatasetRunError, match="cannot name a folder"):
        attribute_dataset(lambda device: {name: InputXGradient(build())}, Examples(2), str(tmp_path), target=0)


def test_a_run_is_never_overwritten_and_resumes_only_what_fits(tmp_path):
    out = str(tmp_path)
    attribute_dataset(lrp_and_ixg, Examples(5), out, batch_size=2, target=0)
    with pytest.raises(DatasetRunError, match="already holds attributions .3 of 3 shards done.; resume it"):
        attribute_dataset(lrp_and_ixg, Examples(5), out, batch_size=2, target=0)
    with pytest.raises(DatasetRunError, match="examples differ"):
        attribute_dataset(lrp_and_ixg, Examples(6), out, batch_size=2, target=0, resume=True)
    with pytest.raises(DatasetRunError, match="the dataset's keys differ"):
        attribute_dataset(lrp_and_ixg, Examples(5), out, batch_size=2, target=0, resume=True, keys="abcde")
    with pytest.raises(DatasetRunError, match="methods differ"):
        attribute_dataset(lambda device: {"ixg": InputXGradient(build())}, Examples(5), out, target=0, resume=True)
    with pytest.raises(DatasetRunError, match="shard_size 4: it was started with 2"):
        attribute_dataset(lrp_and_ixg, Examples(5), out, target=0, resume=True, shard_size=4)
    again = attribute_dataset(lrp_and_ixg, Examples(5), out, batch_size=5, target=0, resume=True)
    assert again.complete and again.shards_before == 3 and again.shards_now == 0


def test_resume_redoes_a_shard_without_its_record_and_clears_temporary_files(tmp_path):
    out = tmp_path / "run"
    attribute_dataset(lrp_and_ixg, Examples(7), str(out), batch_size=2, target=FROM_DATASET)
    expected = {key: value for key, value in open_attributions(str(out), "lrp").items()}
    # As a run killed after shard 1's arrays were renamed, before its record: no record, no index.json yet.
    (out / "shards" / "00000001.json").unlink()
    (out / "index.json").unlink()
    (out / "lrp" / "00000001.npy").write_bytes(b"half a file")
    (out / "ixg" / "00000002.npy.tmp-123-abcdef01").write_bytes(b"a killed writer's leftovers")
    partial = open_attributions(str(out), "lrp")
    assert not partial.complete and "2" not in partial and len(partial) == 5
    summary = attribute_dataset(lrp_and_ixg, Examples(7), str(out), batch_size=2, target=FROM_DATASET, resume=True)
    assert summary.shards_before == 3 and summary.shards_now == 1 and summary.complete
    resumed = open_attributions(str(out), "lrp")
    assert resumed.complete and list(resumed) == list(expected)
    assert all(np.array_equal(resumed[key], value) for key, value in expected.items())
    assert not [path for path in out.rglob("*") if ".tmp-" in path.name]


def test_reading_errors_skip_the_example_and_are_listed_other_errors_stop_the_run(tmp_path):
    summary = attribute_dataset(lrp_and_ixg, Examples(6, broken={1, 4}), str(tmp_path / "a"), batch_size=4, target=0)
    assert summary.failed == {"1": "OSError: example 1 is broken", "4": "OSError: example 4 is broken"}
    assert summary.stored == 4 and summary.complete
    store = open_attributions(str(tmp_path / "a"), "ixg")
    assert list(store) == ["0", "2", "3", "5"] and store.failed == summary.failed
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert [entry["key"] for entry in index["failed"]] == ["1", "4"]
    with pytest.raises(KeyError, match="example 2 is broken"):
        attribute_dataset(lrp_and_ixg, Examples(3, broken={2}, error=KeyError), str(tmp_path / "b"), target=0)


def test_the_reader_is_a_lazy_mapping_of_one_method(tmp_path):
    attribute_dataset(lrp_and_ixg, Examples(3), str(tmp_path), keys=["x", "y", "z"], target=0)
    with pytest.raises(DatasetRunError, match="several methods, lrp, ixg: name one"):
        open_attributions(str(tmp_path))
    with pytest.raises(DatasetRunError, match="no method 'gradcam'"):
        open_attributions(str(tmp_path), "gradcam")
    with pytest.raises(DatasetRunError, match="no attribution run"):
        open_attributions(str(tmp_path / "lrp"))
    store = open_attributions(str(tmp_path), "ixg")
    assert len(store) == 3 and list(store) == ["x", "y", "z"] and "y" in store and "w" not in store
    with pytest.raises(KeyError):
        store["w"]
    assert store["y"].shape == (3, 8, 8) and store["y"].dtype == np.float32
    store["y"][:] = 0  # a copy: the file is not written through
    assert np.abs(open_attributions(str(tmp_path), "ixg")["y"]).sum() > 0


def test_inputs_of_different_shapes_cannot_share_a_batch(tmp_path):
    mixed = [torch.randn(3, 8, 8), torch.randn(3, 9, 9)]
    with pytest.raises(DatasetRunError, match="inputs of different shapes"):
        attribute_dataset(lrp_and_ixg, mixed, str(tmp_path / "a"), batch_size=2, target=0)
    summary = attribute_dataset(lrp_and_ixg, mixed, str(tmp_path / "b"), batch_size=1, target=0)
    assert open_attributions(str(tmp_path / "b"), "lrp")["1"].shape == (3, 9, 9) and summary.complete


def test_evaluation_is_pixel_flipping_of_the_stored_attributions(tmp_path):
    data = Examples(6)
    out = str(tmp_path)
    with pytest.raises(DatasetRunError, match="holds no attribution run"):
        evaluate_dataset(build, data, out)
    attribute_dataset(lrp_and_ixg, data, out, batch_size=4, target=FROM_DATASET)
    summary = evaluate_dataset(build, data, out, batch_size=4, points=8)
    model = build()
    lrp = open_attributions(out, "lrp")
    ranking = torch.from_numpy(np.stack([lrp[str(i)] for i in range(6)]))
    curves = pixel_flipping(model, data.images, data.labels, ranking, points=8)
    assert summary.examples == 6 and summary.points == 8 and set(summary.aopc) == {"lrp", "ixg"}
    assert summary.aopc["lrp"] == pytest.approx(aopc(curves), rel=1e-6)
    assert summary.curves["lrp"] == pytest.approx(curves.mean(0).tolist(), rel=1e-6, abs=1e-7)
    assert summary.random_aopc is not None and len(summary.random_curve) == 9
    written = json.loads((tmp_path / "evaluation.json").read_text())
    assert written["aopc"] == summary.aopc and written["random_aopc"] == summary.random_aopc
    assert evaluate_dataset(build, data, out, batch_size=2, points=8, resume=True) == summary  # nothing left to do
    with pytest.raises(DatasetRunError, match="not the one the attributions"):
        evaluate_dataset(build, Examples(5), out)


def test_evaluation_needs_a_complete_run_with_class_targets(tmp_path):
    attribute_dataset(lrp_and_ixg, Examples(4), str(tmp_path / "a"), batch_size=2, target=0)
    (tmp_path / "a" / "shards" / "00000000.json").unlink()
    with pytest.raises(DatasetRunError, match=r"incomplete \(1 of 2 shards\); resume it first"):
        evaluate_dataset(build, Examples(4), str(tmp_path / "a"))
    scalar = lambda device: {"ixg": InputXGradient(lambda x: build(device)(x).sum(1))}  # noqa: E731
    attribute_dataset(scalar, Examples(2), str(tmp_path / "b"))
    with pytest.raises(DatasetRunError, match="made without a target"):
        evaluate_dataset(build, Examples(2), str(tmp_path / "b"))


def test_pixel_flipping_with_a_fixed_number_of_points_and_a_coarse_map():
    model = build()
    images, targets = torch.randn(2, 3, 10, 10), torch.tensor([0, 3])
    curves = pixel_flipping(model, images, targets, torch.randn(2, 3, 10, 10), points=7)
    assert curves.shape == (2, 8)  # 100 pixels: 0, 14, 29, ..., 100 deleted
    with torch.no_grad():
        assert torch.allclose(curves[:, 0], model(images).gather(1, targets[:, None])[:, 0])
        assert torch.allclose(curves[:, -1], model(torch.zeros_like(images)).gather(1, targets[:, None])[:, 0])
    coarse = torch.rand(2, 1, 5, 5)
    fine = torch.nn.functional.interpolate(coarse.double(), size=(10, 10), mode="bilinear", align_corners=False)
    assert torch.equal(pixel_flipping(model, images, targets, coarse, points=7), pixel_flipping(model, images, targets, fine, points=7))


def test_without_torchrun_the_process_group_is_one_process():
    with process_group("cpu") as info:
        assert (info.rank, info.world_size, info.device) == (0, 1, torch.device("cpu"))
        assert not torch.distributed.is_initialized()


def test_progress_shows_images_per_second(tmp_path, capsys):
    pytest.importorskip("tqdm")
    attribute_dataset(lrp_and_ixg, Examples(4), str(tmp_path), batch_size=2, target=0, progress=True)
    err = capsys.readouterr().err
    assert "attributing" in err and "4/4" in err and "image/s" in err


@pytest.mark.parametrize(
    "case, message",
    [
        ("no folder", "--data must be a folder of images"),
        ("no images", "no images in"),
        ("negative workers", "--workers must be 0 or more"),
        ("run there", "already holds attributions"),
        ("evaluate nothing", "holds no attribution run"),
        ("evaluate an API run", "not written by captum-graph attribute"),
    ],
)
def test_command_line_errors_are_one_line(tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "images" / "sub").mkdir(parents=True)
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (20, 12)).save(tmp_path / "images" / "sub" / "black.png")
    attribute_dataset(lrp_and_ixg, Examples(2), str(tmp_path / "api_run"), target=0)
    base = ["attribute", MODEL, "--size", "16", "--out", str(tmp_path / "out")]
    argv = {
        "no folder": base + ["--data", str(tmp_path / "missing")],
        "no images": base + ["--data", str(tmp_path / "empty")],
        "negative workers": base + ["--data", str(tmp_path / "images"), "--workers", "-1"],
        "run there": ["attribute", MODEL, "--size", "16", "--data", str(tmp_path / "images"), "--out", str(tmp_path / "api_run")],
        "evaluate nothing": ["evaluate", str(tmp_path / "empty")],
        "evaluate an API run": ["evaluate", str(tmp_path / "api_run")],
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("captum-graph: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_the_private_store_accessor_of_the_progress_bar_is_there():
    # captum_graph.dataset._store reads torch.distributed's default store through this private name.
    assert callable(getattr(torch.distributed.distributed_c10d, "_get_default_store", None))


def test_image_files_are_found_recursively_and_broken_ones_are_listed(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    root = tmp_path / "images"
    (root / "b" / "c").mkdir(parents=True)
    Image.new("RGB", (30, 20), (200, 10, 10)).save(root / "b" / "c" / "red.PNG")
    Image.new("L", (12, 40), 128).save(root / "grey.webp")
    Image.new("RGB", (64, 64), (0, 90, 0)).save(root / "b" / "whole.jpg")
    (root / "b" / "truncated.jpg").write_bytes((root / "b" / "whole.jpg").read_bytes()[:200])
    (root / "empty.gif").write_bytes(b"")
    (root / "readme.md").write_text("not an image")
    load = functools.partial(cli._image_input, size=16, mean=cli.IMAGENET_MEAN, std=cli.IMAGENET_STD)
    files = ImageFiles(str(root), load)
    assert files.keys == ["b/c/red.PNG", "b/truncated.jpg", "b/whole.jpg", "empty.gif", "grey.webp"]
    assert files.ignored == ["readme.md"]
    assert files[0].shape == files[4].shape == (3, 16, 16)  # mixed sizes and modes come out alike
    summary = attribute_dataset(lrp_and_ixg, files, str(tmp_path / "out"), batch_size=2, target=0)
    assert sorted(summary.failed) == ["b/truncated.jpg", "empty.gif"], summary.failed
    assert "OSError" in summary.failed["b/truncated.jpg"] and "UnidentifiedImageError" in summary.failed["empty.gif"]
    assert list(open_attributions(str(tmp_path / "out"), "lrp")) == ["b/c/red.PNG", "b/whole.jpg", "grey.webp"]
