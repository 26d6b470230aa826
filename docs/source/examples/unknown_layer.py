# expect: LayerResolutionError
import torch
import torchvision

from captum_graph.attr import LayerGradCam

model = torchvision.models.resnet18(weights=None).eval()
LayerGradCam(model, "layer4.1.ad").attribute(torch.randn(1, 3, 64, 64), target=3)
