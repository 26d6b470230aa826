# expect: ValueError
import torch
import torchvision
from captum.attr._utils.lrp_rules import GammaRule

from captum_graph.attr import LRP

model = torchvision.models.resnet18(weights=None).eval()
LRP(model, rules={"layer1.0.conv": GammaRule()}).attribute(torch.randn(1, 3, 64, 64), target=3)
