import torch
import torchvision
from lxt.efficient import monkey_patch
from torchvision.models import vision_transformer

monkey_patch(vision_transformer)  # patches the classes torchvision's ViT uses, for the whole process

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.vit_b_16(weights=None).eval()
image = torch.randn(1, 3, 224, 224, requires_grad=True)

model(image)[0, 3].backward()
relevance = image * image.grad
