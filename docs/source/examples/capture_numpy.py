# expect: CaptureError
import numpy as np
import torch
from torch import nn

from captum_graph.attr import LRP


class NumpyPostprocess(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        scores = self.linear(x)
        clipped = np.clip(scores.detach().numpy(), -1, 1)  # leaves torch: no graph holds this
        return torch.from_numpy(clipped)


LRP(NumpyPostprocess().eval()).attribute(torch.randn(2, 4), target=0)
