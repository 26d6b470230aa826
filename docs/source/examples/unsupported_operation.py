# expect: UnsupportedOperationError
import torch
from torch import nn

from captum_graph.attr import LRP


class ErfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1, self.linear2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        hidden = torch.erf(self.linear1(x))  # no relevance rule is known for erf
        return self.linear2(hidden)


LRP(ErfNet().eval()).attribute(torch.randn(2, 4), target=0)
