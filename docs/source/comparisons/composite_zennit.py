import torch
import torchvision
from zennit.attribution import Gradient
from zennit.composites import EpsilonPlusFlat
from zennit.torchvision import ResNetCanonizer

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

composite = EpsilonPlusFlat(canonizers=[ResNetCanonizer()])  # a canonizer written for ResNets
with Gradient(model=model, composite=composite) as attributor:
    output, relevance = attributor(image, torch.eye(1000)[[3]])
