# expect: CaptureError
import torch
from torch import nn

from captum_graph import ModelArchitecture


class SmallCNN(nn.Module):  # made for 32x32 images: the linear layer fixes the size
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8 * 32 * 32, 10)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).flatten(1))


ModelArchitecture.from_model(SmallCNN())  # no example inputs: a 224x224 image is assumed
