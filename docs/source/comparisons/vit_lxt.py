import torch
from torchvision.models import (
    vision_transformer, vit_b_16)

from lxt.efficient import monkey_patch

# patches the classes torchvision's ViT uses,
# for the whole process
monkey_patch(vision_transformer)

# same random model and image everywhere
torch.manual_seed(0)
model = vit_b_16(weights=None).eval()
image = torch.randn(1, 3, 224, 224,
                    requires_grad=True)

model(image)[0, 3].backward()
relevance = image * image.grad
