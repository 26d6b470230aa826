"""The README's demo: what captum_graph does on a torchvision ResNet-18."""
import argparse
import warnings

import torch
import torchvision
from captum.attr import LRP as CaptumLRP

from .attr import LRP, LayerGradCam
from .report import format_report, model_report


def run_demo(args: argparse.Namespace) -> int:
    """Print the architecture report of ResNet-18 and compare LRP with Captum's."""
    torch.manual_seed(args.seed)
    warnings.filterwarnings("ignore", message="Input Tensor 0 did not already require gradients")
    model = torchvision.models.resnet18(weights=None).eval()
    print(format_report(model_report(model), max_rules=12))
    images = torch.randn(2, 3, 224, 224)
    target = model(images).argmax(1)
    logits = model(images).gather(1, target[:, None]).squeeze(1)
    ours = LRP(model).attribute(images, target=target).sum((1, 2, 3))
    theirs = CaptumLRP(model).attribute(images, target=target).sum((1, 2, 3))
    print("\nConservation (sum of input relevance vs target logit), random weights:")
    print(f"  {'example':<8} {'logit':>12} {'captum_graph':>14} {'captum':>14}")
    for i in range(len(images)):
        print(f"  {i:<8} {logits[i].item():>12.4f} {ours[i].item():>14.4f} {theirs[i].item():>14.4g}")
    cam = LayerGradCam(model)
    heatmap = cam.attribute(images, target=target)
    print(f"\nAutomatic Grad-CAM layer: {cam.layer_name}; heatmap shape {tuple(heatmap.shape)}")
    return 0
