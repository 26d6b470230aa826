"""The ``captum-graph`` command, run as users run it: ``python -m captum_graph ...`` in a subprocess.

Each subcommand runs here in its own process (exit code, files, valid PNGs,
what is printed). Starting Python with torch, torchvision and captum costs
about 7 s on two cores, so:

* the processes of this module are started together, on first use, and each
  test waits for its own (two cores run two at a time);
* the many bad-input cases (and ``inspect``'s text output) are checked
  in-process in ``test_cli_inprocess.py``, through the same ``main()``; one
  bad input is repeated here end to end to show that it ends the process with
  one line on stderr and no traceback.
"""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from captum_graph.demo import DEMO_PRESET  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def tiny_image(path: Path, size=(40, 48)) -> Path:
    pixels = bytes((x * 7 + y * 13 + c * 50) % 256 for y in range(size[1]) for x in range(size[0]) for c in range(3))
    Image.frombytes("RGB", size, pixels).save(path)
    return path


def assert_png(path: Path) -> None:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as image:
        assert image.format == "PNG", f"{path} is {image.format}, not a PNG"
        image.verify()


class Launched:
    """The module's CLI processes, started at once; ``result(name)`` waits for one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        tiny_image(root / "first.png")
        tiny_image(root / "second.png", size=(64, 40))
        commands: Dict[str, List[str]] = {
            "demo": ["demo", "--fast", "--out", str(root / "demo_out"), "--seed", "1"],
            "inspect_json": ["inspect", "torchvision:resnet18", "--json"],
            "explain": [
                "explain", "torchvision:resnet18", "--image", str(root / "first.png"), str(root / "second.png"),
                "--size", "64", "--method", "lrp", "--method", "gradcam,ixg", "--out", str(root / "heatmaps"),
            ],
            "bad_input": [
                "explain", "torchvision:resnet18", "--size", "32", "--out", str(root / "unused"),
                "--image", str(root / "first.png"), "missing.png",
            ],
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
        env["MPLBACKEND"] = "Agg"
        self.processes = {
            name: subprocess.Popen(
                [sys.executable, "-m", "captum_graph", *args],
                cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for name, args in commands.items()
        }
        self.results: Dict[str, subprocess.CompletedProcess] = {}

    def result(self, name: str) -> subprocess.CompletedProcess:
        if name not in self.results:
            process = self.processes[name]
            out, err = process.communicate(timeout=TIMEOUT_S)
            self.results[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        return self.results[name]

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.communicate()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    runs = Launched(tmp_path_factory.mktemp("cli"))
    yield runs
    runs.stop()


def test_demo_fast_writes_figures_tables_and_numbers(launched):
    result = launched.result("demo")
    out = launched.root / "demo_out"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "Test accuracy:" in result.stdout
    for name in ("explanations.png", "pixel_flipping.png"):
        assert_png(out / name)
    with open(out / "conservation.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4  # --fast explains four digits
    assert {"logit", "lrp_epsilon", "lrp_" + DEMO_PRESET.replace("-", "_"), "input_x_gradient"} <= set(rows[0])
    with open(out / "pixel_flipping.csv") as handle:
        flipping = list(csv.DictReader(handle))
    assert flipping[-1]["pixels_deleted"] == "AOPC"
    for method in ("LRP ε", f"LRP {DEMO_PRESET}", "Grad-CAM", "Input × Gradient", "random order"):
        assert any(method in line and "AOPC" in line for line in result.stdout.splitlines()), method
    assert str(out.resolve()) in result.stdout  # says where it wrote everything


def test_inspect_json_parses(launched):
    result = launched.result("inspect_json")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert report["model"] == "ResNet"
    assert report["unsupported"] == []
    assert report["gradcam_layer"].startswith("layer4")
    assert any(r["node"] == "layer1.0.add" for r in report["rewritten"])


def test_explain_writes_one_overlay_per_image_and_method(launched):
    result = launched.result("explain")
    out = launched.root / "heatmaps"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    expected = sorted(f"{image}_{method}.png" for image in ("first", "second") for method in ("lrp", "gradcam", "ixg"))
    assert sorted(p.name for p in out.iterdir()) == expected
    for name in expected:
        assert_png(out / name)
    assert "Wrote 6 heatmap overlays" in result.stdout


def test_bad_input_ends_the_process_with_one_line(launched):
    result = launched.result("bad_input")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["captum-graph: error: image not found: missing.png"], result.stderr
    assert not (launched.root / "unused").exists()  # checked before anything is written
