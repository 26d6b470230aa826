import torch
import torchvision
from captum.attr import LayerAttribution
from captum_graph.attr import LayerGradCam

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

cam = LayerGradCam(model)  # the layer is chosen from the graph: cam.layer_name after the call
coarse = cam.attribute(image, target=3, relu_attributions=True)  # (1, 1, 7, 7)
heatmap = LayerAttribution.interpolate(coarse, (224, 224), "bilinear")  # (1, 1, 224, 224)
