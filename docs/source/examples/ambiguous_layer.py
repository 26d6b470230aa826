# expect: LayerResolutionError
import torch
from torch import nn

from captum_graph.attr import LayerLRP


class SharedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3)
        self.relu = nn.ReLU()  # one module, called twice below
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.head(x.mean((2, 3)))


LayerLRP(SharedReLU().eval(), "relu").attribute(torch.randn(1, 3, 32, 32), target=3)
