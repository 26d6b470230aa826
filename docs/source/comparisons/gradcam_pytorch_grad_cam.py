import torch
import torchvision
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

with GradCAM(model=model, target_layers=[model.layer4[-1]]) as cam:  # you pick the layer
    heatmap = cam(input_tensor=image, targets=[ClassifierOutputTarget(3)])  # (1, 224, 224), scaled to [0, 1]
