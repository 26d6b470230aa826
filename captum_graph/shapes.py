"""Output shapes of every node, recorded by running example inputs once."""
from typing import Dict, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from .cloning import private_graph_copy, set_training

__all__ = ["propagate_shapes", "token_gradients"]


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    """Store ``tensor_meta`` (shape, dtype) on each node of ``gm``'s graph.

    Runs on a private copy of the modules and the graph in eval mode, without
    gradients, so no hook of the user's fires, no running statistic changes,
    and ``gm``'s graph is never owned by another module, even for a moment.
    """
    shadow = set_training(private_graph_copy(gm), False)  # its own graph: ``gm``'s stays owned by ``gm`` for other readers
    with torch.no_grad():
        ShapeProp(shadow).propagate(*example_inputs)
    for node, twin in zip(gm.graph.nodes, shadow.graph.nodes):
        for key in ("tensor_meta", "type"):
            if key in twin.meta:
                node.meta[key] = twin.meta[key]


def token_gradients(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> Dict[fx.Node, bool]:
    """For each 3-D node ``(N, T, C)``: whether tokens after the first get gradient from the output.

    Runs one forward and backward pass on a private copy in eval mode, whose
    all-zero parameters (zero-initialised heads) are redrawn: which tokens
    reach the output is a property of the structure, not of the weights.
    """
    shadow = set_training(private_graph_copy(gm), False)
    _redraw_zero_parameters(shadow)
    recorder = _TokenRecorder(shadow)
    with torch.enable_grad():
        inputs = [x.detach().clone().requires_grad_() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in example_inputs]
        output = recorder.run(*inputs)
        outputs = [o for o in (output if isinstance(output, (tuple, list)) else (output,)) if isinstance(o, torch.Tensor)]
        sum(o.sum() for o in outputs).backward()
    originals = dict(zip(shadow.graph.nodes, gm.graph.nodes))
    return {
        originals[node]: value.grad is not None and bool(value.grad[:, 1:].abs().sum() > 0)
        for node, value in recorder.tokens.items()
    }


def _redraw_zero_parameters(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for owner in module.modules():
        for name, parameter in owner._parameters.items():
            if parameter is not None and parameter.is_floating_point() and not parameter.any():
                fresh = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
                owner._parameters[name] = nn.Parameter(fresh.to(parameter.device), requires_grad=False)


class _TokenRecorder(fx.Interpreter):
    def __init__(self, module: fx.GraphModule) -> None:
        super().__init__(module)
        self.tokens: Dict[fx.Node, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        if isinstance(value, torch.Tensor) and value.dim() == 3 and value.requires_grad and value.is_floating_point():
            value.retain_grad()
            self.tokens[node] = value
        return value
