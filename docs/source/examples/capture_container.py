# expect: CaptureError
import torch
from torch import nn

from captum_graph.attr import LRP


class Masked(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x, extras):
        return self.linear(x * extras["mask"])


x, mask = torch.randn(2, 4), torch.ones(2, 4)
LRP(Masked().eval()).attribute(x, target=0, additional_forward_args=({"mask": mask},))
