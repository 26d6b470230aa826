import torch
from torchvision.models import resnet18
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils import model_targets

# same random model and image everywhere
torch.manual_seed(0)
model = resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# you choose the layer
layers = [model.layer4[-1]]
with GradCAM(model, layers) as cam:
    # (1, 224, 224), scaled to [0, 1]
    heatmap = cam(input_tensor=image, targets=[
        model_targets.ClassifierOutputTarget(3)])
