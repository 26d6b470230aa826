# expect: CaptureError
import torch
import torchvision

from captum_graph import prepare

model = torchvision.models.resnet18(weights=None).eval()
graph = prepare(model, (torch.randn(2, 3, 64, 64),)).graph_module  # captured at 64x64
graph(torch.randn(2, 3, 96, 96))
