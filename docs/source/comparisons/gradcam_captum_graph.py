import torch
from torchvision.models import resnet18

from captum.attr import LayerAttribution
from captum_graph.attr import LayerGradCam

# same random model and image everywhere
torch.manual_seed(0)
model = resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# the layer is chosen from the graph
cam = LayerGradCam(model)
coarse = cam.attribute(  # (1, 1, 7, 7)
    image, target=3, relu_attributions=True)
heatmap = LayerAttribution.interpolate(
    coarse, (224, 224), "bilinear")
print(cam.layer_name)  # layer4.1.relu_1
