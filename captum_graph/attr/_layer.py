"""Captum's layer methods with layers given by name, by graph node, or chosen automatically."""
import inspect
import weakref
from typing import Any, Dict, Optional, Tuple

import torch.fx as fx
from captum.attr import GuidedGradCam as _GuidedGradCam
from captum.attr import LayerActivation as _LayerActivation
from captum.attr import LayerConductance as _LayerConductance
from captum.attr import LayerDeepLift as _LayerDeepLift
from captum.attr import LayerGradCam as _LayerGradCam
from captum.attr import LayerGradientXActivation as _LayerGradientXActivation
from captum.attr import LayerIntegratedGradients as _LayerIntegratedGradients
from torch import nn

from ..architecture import ModelArchitecture
from ..capture import shape_check
from ..errors import LayerResolutionError
from ..layers import LayerSpec, check_layer_spec, resolve_layer
from ..modules import GridToTokens, Tap, TokensToGrid
from ..prepare import PreparedModel, prepare
from ._args import call_arguments

__all__ = [
    "LayerGradCam",
    "LayerActivation",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "LayerConductance",
    "LayerDeepLift",
    "GuidedGradCam",
    "tapped_graph",
]

_TAP = "captum_graph_tap"
_UNTAP = "captum_graph_untap"


def tapped_graph(
    model: nn.Module, layer: Optional[LayerSpec], inputs: Any = None, additional_forward_args: Any = None
) -> Tuple[fx.GraphModule, Tap, fx.Node]:
    """A copy of the model's rewritten graph, captured at these inputs, with an identity :class:`Tap` after ``layer``.

    ``layer=None`` picks the Grad-CAM layer (see
    :meth:`ModelArchitecture.find_cam_target_node`). For a token layer
    ``(N, T, C)`` (ViT) the tap is a :class:`TokensToGrid`, so layer methods
    see an ``(N, C, h, w)`` map without class tokens. The copy shares the
    rewritten graph's private modules; the user's model is not involved.
    ``inputs=None`` captures at an example image.
    """
    # Captum's layer methods run the model at other batch sizes (steps, baselines): any batch must do
    prepared = prepare(model, None if inputs is None else call_arguments(inputs, additional_forward_args), any_batch=True)
    key = id(layer) if isinstance(layer, nn.Module) else layer
    cached = _TAPPED.setdefault(prepared, {}).get(key)
    if cached is None:
        cached = _TAPPED[prepared][key] = _tapped(model, prepared, layer)
    return cached


# Tapped graphs per prepared graph and layer: choosing the automatic layer runs the graph once.
_TAPPED: "weakref.WeakKeyDictionary[PreparedModel, Dict[Any, Tuple[fx.GraphModule, Tap, fx.Node]]]" = weakref.WeakKeyDictionary()


def _tapped(model: nn.Module, prepared: PreparedModel, layer: Optional[LayerSpec]) -> Tuple[fx.GraphModule, Tap, fx.Node]:
    source = prepared.graph_module
    architecture = prepared.architecture(model)
    node = _auto_layer(architecture) if layer is None else resolve_layer(model, prepared, layer)
    graph = fx.Graph()
    copies = {}
    output = graph.graph_copy(source.graph, copies)
    graph.output(output)
    tapped = copies[node]
    reference = _grid_reference(architecture, node)
    with graph.inserting_after(tapped):
        if reference is None:
            tap_node = graph.call_module(_TAP, (tapped,))
            last = tap_node
        else:  # tokens: the layer is their grid, put back in place for the rest of the model
            tap_node = graph.call_module(_TAP, (tapped, copies[reference]))
            with graph.inserting_after(tap_node):
                last = graph.call_module(_UNTAP, (tap_node, tapped))
    tapped.replace_all_uses_with(last, delete_user_cb=lambda user: user not in (tap_node, last))
    tap = Tap() if reference is None else TokensToGrid(architecture.token_grid_dims(architecture._info(reference)))
    extra = {} if reference is None else {_UNTAP: GridToTokens()}
    owners = {n.target: _fetch(source, n.target) for n in graph.nodes if n.op in ("call_module", "get_attr") and n.target not in (_TAP, _UNTAP)}
    gm = fx.GraphModule({**owners, _TAP: tap, **extra}, graph, type(model).__name__)
    gm.register_forward_pre_hook(shape_check(gm), with_kwargs=True)  # as the captured graph: never at other sizes
    return gm, tap, node


def _grid_reference(architecture: ModelArchitecture, node: fx.Node) -> Optional[fx.Node]:
    """For a token node, the feature map whose grid its tokens form; else ``None``."""
    architecture._ensure_shapes()
    found = architecture.token_grid_reference(architecture._info(node))
    return None if found is None else found._node


def _fetch(root: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _auto_layer(architecture: ModelArchitecture) -> fx.Node:
    found = architecture.find_cam_target_node()
    if found is None:
        raise LayerResolutionError(
            f"found no feature map with spatial extent in {type(architecture.model).__name__}; "
            "pass layer=... explicitly"
        )
    return found._node


class _GraphLayerMixin:
    """Resolves ``layer`` on the graph captured at each call and runs Captum on a tapped copy of it."""

    _captum_class: type

    def __repr__(self) -> str:
        layer = self.layer_name or self.layer_spec or "automatic"
        return f"{type(self).__name__}(model={type(self.model_to_explain).__name__}, layer='{layer}')"

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        """See the Captum method of the same class; the graph is captured at ``inputs``."""
        bound = inspect.signature(self._captum_class.attribute).bind(self, *args, **kwargs)
        inputs = bound.arguments["inputs"]
        additional = bound.arguments.get("additional_forward_args")
        gm, tap, node = tapped_graph(self.model_to_explain, self.layer_spec, inputs, additional)
        self.layer_name = node.meta.get("qualname", node.name)
        delegate = self._captum_class(gm, tap, *self._init_args, **self._init_kwargs)
        return delegate.attribute(*args, **kwargs)


def _graph_layer_class(captum_class: type, doc: str) -> type:
    def __init__(self, model: nn.Module, layer: Optional[LayerSpec] = None, *args: Any, **kwargs: Any) -> None:
        if layer is not None:
            check_layer_spec(model, layer)
        captum_class.__init__(self, model, layer if isinstance(layer, nn.Module) else None, *args, **kwargs)
        self.model_to_explain = model
        self.layer_spec = layer
        self.layer_name: Optional[str] = None  # the node chosen, known after the first call
        self._init_args, self._init_kwargs = args, kwargs

    return type(
        captum_class.__name__,
        (_GraphLayerMixin, captum_class),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "_captum_class": captum_class},
    )


_DOC = """Captum's ``{name}`` on the model's rewritten graph.

Same arguments and return shapes as :class:`captum.attr.{name}`. ``layer``
may be a module, a module's qualified name (``"layer4"``), or a graph node's
qualified or fx name (``"layer4.1.add"``, ``"add_7"``), so functional
operations can be targets.{extra} The graph is captured at each call's
inputs; the chosen node is in ``layer_name`` after a call.
"""

LayerGradCam = _graph_layer_class(
    _LayerGradCam,
    _DOC.format(
        name="LayerGradCam",
        extra=" With ``layer`` omitted the graph picks the last feature map with spatial "
        "extent, before global pooling, that every path to the output passes through.",
    ),
)
LayerActivation = _graph_layer_class(_LayerActivation, _DOC.format(name="LayerActivation", extra=""))
LayerGradientXActivation = _graph_layer_class(
    _LayerGradientXActivation, _DOC.format(name="LayerGradientXActivation", extra="")
)
LayerIntegratedGradients = _graph_layer_class(
    _LayerIntegratedGradients, _DOC.format(name="LayerIntegratedGradients", extra="")
)
LayerConductance = _graph_layer_class(_LayerConductance, _DOC.format(name="LayerConductance", extra=""))
LayerDeepLift = _graph_layer_class(_LayerDeepLift, _DOC.format(name="LayerDeepLift", extra=""))
GuidedGradCam = _graph_layer_class(_GuidedGradCam, _DOC.format(name="GuidedGradCam", extra=""))
