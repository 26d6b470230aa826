import torch
from torchvision.models import resnet18
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

# same random model and image everywhere
torch.manual_seed(0)
model = resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# a canonizer written for ResNets
composite = EpsilonPlusFlat(
    canonizers=[ResNetCanonizer()])
with Gradient(model, composite) as attributor:
    output, relevance = attributor(
        image, torch.eye(1000)[[3]])
