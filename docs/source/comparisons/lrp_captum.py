import torch
from torchvision.models import resnet18

from captum.attr import LRP

# same random model and image everywhere
torch.manual_seed(0)
model = resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

relevance = LRP(model).attribute(
    image, target=3)
