"""A tiny image classifier for the dataset tests: ``tiny_model.py:factory`` on the command line.

Convolutions, a residual ``+``, ReLU, global mean and a linear head: LRP,
Grad-CAM (automatic layer) and InputXGradient all run on it in milliseconds.
Weights come from a fixed seed, so every process builds the same model.

``CAPTUM_GRAPH_TEST_DELAY`` (seconds) makes each forward pass sleep: the
kill-and-resume test uses it to stop a run in the middle.
"""
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


class Tiny(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Linear(6, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delay = float(os.environ.get("CAPTUM_GRAPH_TEST_DELAY", "0"))
        if delay:
            time.sleep(delay)
        x = F.relu(self.stem(x))
        x = F.relu(x + self.conv(x))
        return self.head(x.mean((2, 3)))


def factory(num_classes: int = 5) -> nn.Module:
    generator = torch.random.fork_rng()
    with generator:
        torch.manual_seed(0)
        return Tiny(num_classes).eval()
