"""The model's output together with the activations of named layers, in one pass."""
import weakref
from typing import Any, Dict, Sequence, Tuple

import torch.fx as fx
from torch import Tensor, nn

from .layers import LayerSpec, check_layer_spec, resolve_layer
from .prepare import PreparedModel, prepare

__all__ = ["ActivationExtractor"]


class ActivationExtractor(nn.Module):
    """Wraps a model so that calling it returns ``(output, {name: activation})``.

    ``layers`` are modules, module names or graph node names (functional
    operations included, e.g. ``"layer1.0.add"``); the dictionary is keyed by
    the names as given (modules by their qualified name). The model runs once
    per call and is not modified.

    Raises:
        LayerResolutionError: an unknown name (with close names) or a module
            called at several places.
        ValueError: the same layer named twice.

    Examples::

        >>> extractor = ActivationExtractor(resnet, ["layer3", "layer4.1.add"])
        >>> logits, acts = extractor(images)
        >>> acts["layer4.1.add"].shape
        torch.Size([8, 512, 7, 7])
    """

    def __init__(self, model: nn.Module, layers: Sequence[LayerSpec]) -> None:
        super().__init__()
        names = [_key(model, layer) for layer in layers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"layers named more than once: {', '.join(duplicates)}")
        for layer in layers:
            check_layer_spec(model, layer)
        self.layer_names = names
        self._model = [model]  # not a submodule: the extractor owns no parameters of its own
        self._layers = list(layers)
        self._graphs: "weakref.WeakKeyDictionary[PreparedModel, fx.GraphModule]" = weakref.WeakKeyDictionary()

    def forward(self, *args: Any) -> Tuple[Any, Dict[str, Tensor]]:
        model = self._model[0]
        prepared = prepare(model, args)
        graph_module = self._graphs.get(prepared)
        if graph_module is None:
            nodes = [resolve_layer(model, prepared, layer) for layer in self._layers]
            graph_module = _with_extra_outputs(prepared.graph_module, dict(zip(self.layer_names, nodes)))
            self._graphs[prepared] = graph_module
        return graph_module(*args)


def _key(model: nn.Module, layer: LayerSpec) -> str:
    if isinstance(layer, str):
        return layer
    for name, module in model.named_modules():
        if module is layer:
            return name
    return repr(layer)


def _with_extra_outputs(source: fx.GraphModule, extra: Dict[str, fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    copies: Dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(source.graph, copies)
    graph.output((output, {name: copies[node] for name, node in extra.items()}))
    return fx.GraphModule(source, graph, type(source).__name__)
