"""``benchmarks/faithfulness.py``: its metrics give the known answers, its data hold the evidence they claim.

The benchmark itself trains two models and takes minutes; here its pieces run on
inputs whose scores are known by construction.
"""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("quantus")
pytest.importorskip("sklearn")

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "faithfulness.py"
_SPEC = importlib.util.spec_from_file_location("faithfulness", _PATH)
faithfulness = importlib.util.module_from_spec(_SPEC)
sys.modules["faithfulness"] = faithfulness  # dataclasses look their module up by name
_SPEC.loader.exec_module(faithfulness)


def _box_mask(n: int = 3, size: int = 8) -> torch.Tensor:
    mask = torch.zeros(n, size, size, dtype=torch.bool)
    mask[:, 2:4, 2:6] = True  # 8 pixels
    return mask


def test_a_map_inside_the_evidence_scores_one_and_one_outside_scores_zero():
    mask = _box_mask()
    inside = mask.double() * torch.rand(mask.shape, dtype=torch.float64) + mask.double()
    outside = (~mask).double() * (1 + torch.rand(mask.shape, dtype=torch.float64))
    assert faithfulness.localisation(inside, mask) == pytest.approx(
        {"relevance_mass": 1.0, "relevance_rank": 1.0, "pointing_game": 1.0}
    )
    assert faithfulness.localisation(outside, mask) == pytest.approx(
        {"relevance_mass": 0.0, "relevance_rank": 0.0, "pointing_game": 0.0}
    )


def test_scores_use_positive_relevance_and_count_partial_overlap():
    mask = _box_mask(n=1)
    relevance = torch.zeros(1, 8, 8, dtype=torch.float64)
    relevance[0, 2, 2:6] = 1.0  # 4 evidence pixels, half the box
    relevance[0, 6, 0:4] = 1.0  # 4 pixels outside, as much relevance
    relevance[0, 7, :] = -5.0  # negative relevance is left out of every score
    scores = faithfulness.localisation(relevance, mask)
    assert scores["relevance_mass"] == pytest.approx(0.5)
    assert scores["relevance_rank"] == pytest.approx(0.5)  # of the top 8 pixels, 4 in the box


class _Sum(nn.Module):
    """The logit of class 0 is the sum of the pixels: deleting a pixel removes exactly its value."""

    def forward(self, x):
        return x.flatten(1).sum(1, keepdim=True)


def test_deletion_aopc_is_the_mean_drop_of_the_logit_along_the_curve():
    images = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    task = faithfulness.Task(
        "toy", _Sum(), images, torch.zeros(1, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.bool),
        lambda x, mask: torch.where(mask[:, None], torch.zeros_like(x), x), {},
    )
    # delete 0, 2 and 4 of the 16 pixels: by value (15 + 14, then + 13 + 12) or in reverse (0 + 1, + 2 + 3)
    best = faithfulness.deletion_aopc(task, images[:, 0], fraction=0.25, points=3)
    worst = faithfulness.deletion_aopc(task, -images[:, 0], fraction=0.25, points=3)
    assert best == pytest.approx((0 + 29 + 54) / 3)
    assert worst == pytest.approx((0 + 1 + 6) / 3)


def test_canvas_digits_put_every_digit_pixel_inside_its_box():
    images, labels, masks = faithfulness.canvas_digits(20, size=32, scale=2, noise=0.0, seed=0)
    assert images.shape == (20, 1, 32, 32) and labels.shape == (20,) and masks.shape == (20, 32, 32)
    assert int(masks[0].sum()) == 16 * 16
    assert bool((images[:, 0][~masks] == 0).all())  # no noise: nothing outside the boxes
    assert bool((images[:, 0] * masks).flatten(1).sum(1).gt(0).all())  # every digit has ink inside its box


def test_the_csv_has_the_columns_the_issue_names(tmp_path):
    results = [faithfulness.Result("images", "lrp:epsilon", metric, 0.5) for metric in faithfulness.METRICS]
    path = tmp_path / "faithfulness.csv"
    faithfulness.write_csv(results, str(path))
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0]) == ["task", "method", "metric", "value"]
    assert {row["metric"] for row in rows} == {"relevance_mass", "relevance_rank", "pointing_game", "aopc"}
    assert "| images | lrp:epsilon | 0.500 | 0.500 | 0.500 | 0.500 |" in faithfulness.table(results)
