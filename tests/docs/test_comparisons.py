"""Runs the snippets of the site's "Coming from" page and checks what the page says about them.

Each snippet builds the same random model and image (seed 0). A snippet of
another library runs where that library is installed (the ``docs`` extra has
zennit and grad-cam); LXT patches classes for the whole process, so its
snippet runs in a subprocess, where ``lxt.efficient`` imports.
"""
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
COMPARISONS = REPO / "docs" / "source" / "comparisons"


def _run(name: str) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return runpy.run_path(str(COMPARISONS / f"{name}.py"), run_name="__main__")


def _logit(namespace: dict) -> torch.Tensor:
    with torch.no_grad():
        return namespace["model"](namespace["image"])[0, 3]


def test_captum_lrp_explodes_on_a_resnet_and_captum_graph_conserves():
    captum, ours = _run("lrp_captum"), _run("lrp_captum_graph")
    logit = _logit(ours)
    assert ours["relevance"].shape == captum["relevance"].shape == ours["image"].shape
    assert abs(ours["relevance"].sum() / logit - 1) < 0.2, "captum_graph's relevance should sum to about the logit"
    assert abs(captum["relevance"].sum() / logit) > 1e6, "the page says plain Captum's LRP explodes here"


def test_zennit_epsilon_plus_flat_equals_the_preset():
    pytest.importorskip("zennit")
    zennit, ours = _run("composite_zennit"), _run("composite_captum_graph")
    scaled = zennit["relevance"] * zennit["output"][0, 3]  # zennit starts from the one-hot vector, Captum from the logit
    error = ((scaled - ours["relevance"]).abs().max() / scaled.abs().max()).item()
    assert error < 1e-3, f"zennit and captum_graph differ by {error:.1e} of the largest relevance"


def test_pytorch_grad_cam_equals_the_automatic_layer_gradcam():
    pytest.importorskip("pytorch_grad_cam")
    theirs, ours = _run("gradcam_pytorch_grad_cam"), _run("gradcam_captum_graph")
    assert ours["cam"].layer_name == "layer4.1.relu_1"
    heatmap = ours["heatmap"][:, 0].detach()
    heatmap = heatmap - heatmap.amin((1, 2), keepdim=True)
    heatmap = (heatmap / (heatmap.amax((1, 2), keepdim=True) + 1e-7)).numpy()  # pytorch-grad-cam's scaling
    assert theirs["heatmap"].shape == heatmap.shape
    assert np.abs(theirs["heatmap"] - heatmap).max() < 1e-5


@pytest.mark.slow
def test_vit_snippets(tmp_path):
    ours = _run("vit_captum_graph")
    assert ours["relevance"].shape == ours["image"].shape and torch.isfinite(ours["relevance"]).all()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    probe = subprocess.run([sys.executable, "-c", "import lxt.efficient"], env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["not installed"])[-1]
        pytest.skip(f"lxt.efficient does not import here, so the LXT snippet is not executed: {reason}")
    script = f"import runpy, torch; ns = runpy.run_path({str(COMPARISONS / 'vit_lxt.py')!r}); torch.save(ns['relevance'].detach(), {str(tmp_path / 'r.pt')!r})"
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = torch.load(tmp_path / "r.pt")
    assert theirs.shape == ours["relevance"].shape and torch.isfinite(theirs).all()
