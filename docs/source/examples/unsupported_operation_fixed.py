import torch
from torch import nn

import captum_graph
from captum_graph.attr import LRP
from captum_graph.rules import PassThroughRule


@captum_graph.register_leaf_module  # keep each call as one node of the graph
class Erf(nn.Module):
    def forward(self, x):
        return torch.erf(x)


# erf is monotonic and elementwise, like the activations: relevance passes through it
captum_graph.register_rule(Erf, PassThroughRule())


class ErfNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear1, self.erf, self.linear2 = nn.Linear(4, 8), Erf(), nn.Linear(8, 3)

    def forward(self, x):
        return self.linear2(self.erf(self.linear1(x)))


relevance = LRP(ErfNet().eval()).attribute(torch.randn(2, 4), target=0)
print(relevance.shape)
