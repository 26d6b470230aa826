import torch
import torchvision
from captum_graph.attr import LRP  # the only line that changes

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

relevance = LRP(model).attribute(image, target=3)
