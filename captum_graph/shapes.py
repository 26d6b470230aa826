"""Output shapes of every node, recorded by running example inputs once."""
from typing import Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .cloning import private_copy

__all__ = ["propagate_shapes", "default_example_inputs"]


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Store ``tensor_meta`` (shape, dtype) on each node of ``gm``'s graph.

    Runs on a private copy of the modules in eval mode, without gradients, so
    no hook of the user's fires and no running statistic changes.
    """
    shadow = fx.GraphModule(private_copy(gm).eval(), gm.graph)
    with torch.no_grad():
        ShapeProp(shadow).propagate(*example_inputs)
    gm.graph.owning_module = gm  # GraphModule() above took ownership of the graph


def default_example_inputs(gm: fx.GraphModule) -> Optional[Tuple[torch.Tensor]]:
    """One image-sized input for the first convolution's channels, or ``None``.

    Uses the model's ``image_size`` attribute if it has one (torchvision ViT),
    else 224x224.
    """
    for module in gm.modules():
        if isinstance(module, nn.Conv2d):
            size = getattr(gm, "image_size", 224)
            parameter = module.weight
            return (torch.zeros(1, module.in_channels, size, size, dtype=parameter.dtype, device=parameter.device),)
    return None
