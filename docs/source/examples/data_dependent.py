import torch
from captum.attr import InputXGradient
from torch import nn

from captum_graph.attr import LRP


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.small, self.large = nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)

    def forward(self, x):
        if x.abs().mean() > 1:  # a branch on tensor values
            return self.large(x)
        return self.small(x)


model = Branching().eval()
lrp = LRP(model)
for scale in (0.1, 10.0):
    x = torch.full((1, 4), scale)
    relevance = lrp.attribute(x, target=0)
    same = torch.allclose(relevance, InputXGradient(model).attribute(x, target=0))
    print(f"scale {scale}: explained along the branch it takes (equals Gradient x Input): {same}")
