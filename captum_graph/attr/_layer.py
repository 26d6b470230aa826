"""Captum's layer methods: Captum's own code where the layer is a module, the model's graph where it is not.

A layer given as a module (or a module's qualified name, or a list of them)
needs no graph: Captum's own implementation runs, unchanged, on a private
working copy of the model (:func:`working_copy`), so its hooks never touch the
user's modules and calls running at the same time never see each other's
hooks. The result is Captum's, bit for bit. The graph is used where it adds
something: a functional operation as the layer (``"layer1.0.add"``) and the
automatic Grad-CAM layer (``LayerGradCam(model)``).
"""
import inspect
import operator
import threading
import weakref
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch.fx as fx
from captum.attr import GuidedGradCam as _GuidedGradCam
from captum.attr import LayerActivation as _LayerActivation
from captum.attr import LayerConductance as _LayerConductance
from captum.attr import LayerDeepLift as _LayerDeepLift
from captum.attr import LayerGradCam as _LayerGradCam
from captum.attr import LayerGradientXActivation as _LayerGradientXActivation
from captum.attr import LayerIntegratedGradients as _LayerIntegratedGradients
from torch import Tensor, nn

from ..architecture import ModelArchitecture
from ..capture import shape_check
from ..cloning import borrowed, private_copy
from ..errors import LayerResolutionError
from ..finite import check_finite_inputs
from ..layers import LayerSpec, check_layer_spec, named_modules_for, resolve_layer
from ..modules import GridToTokens, Tap, TokensToGrid
from ..prepare import PreparedModel, prepare, unwrap, unwrap_layer
from ._args import call_arguments, input_aliases

__all__ = [
    "LayerGradCam",
    "LayerActivation",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "LayerConductance",
    "LayerDeepLift",
    "GuidedGradCam",
    "tapped_graph",
    "working_copy",
]

_TAP = "captum_graph_tap"
_UNTAP = "captum_graph_untap"

Layers = Union[None, LayerSpec, List[LayerSpec]]


def working_copy(model: nn.Module) -> nn.Module:
    """The private copy of the user's model that one call of Captum's code runs on.

    A :func:`~captum_graph.cloning.private_copy` (parameters share storage)
    that keeps what Captum's code on the model itself would see: the
    modules' own hooks (copied: hooks Captum adds stay on the copy) and each
    parameter's ``requires_grad`` (the output of a layer that depends on
    parameters only, an embedding of integer ids, needs it for Captum's
    gradient hooks). Made fresh for every call (one small function, so a
    pool can take its place): about 25 µs of CPU per module, 3.5 ms for
    ResNet-50, 2% of one Grad-CAM call on it at 224x224.
    """
    copy = private_copy(model)
    for original, mine in zip(model.modules(), copy.modules()):  # the same order: the copy mirrors the model
        for key, value in vars(original).items():
            if "hook" in key and isinstance(value, dict):
                mine.__dict__[key] = type(value)(value)
        for name, parameter in original._parameters.items():
            if parameter is not None:
                mine._parameters[name].requires_grad_(parameter.requires_grad)
    return copy


def _with_gradients(copy: fx.GraphModule) -> None:
    """Make the floating-point parameters of a working copy of a tapped graph require gradients.

    As the user's would: Captum's gradient hooks need tensors that do (the
    output of a layer that depends on parameters only, an embedding of ids).
    """
    for parameter in copy.parameters():
        parameter.requires_grad_(parameter.is_floating_point())


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
    gm, taps, nodes = _tapped_graph(model, [layer], inputs, additional_forward_args, at_input=False)
    return gm, gm.get_submodule(taps[0]), nodes[0]


def _tapped_graph(
    model: nn.Module, layers: Sequence[Optional[LayerSpec]], inputs: Any, additional_forward_args: Any, at_input: bool
) -> Tuple[fx.GraphModule, List[str], List[fx.Node]]:
    """The tapped graph for ``layers`` (names of the taps, nodes tapped); cached per prepared graph."""
    # Captum's layer methods run the model at other batch sizes (steps, baselines): any batch must do
    prepared = prepare(model, None if inputs is None else call_arguments(inputs, additional_forward_args), any_batch=True)
    key = (tuple(id(layer) if isinstance(layer, nn.Module) else layer for layer in layers), at_input)
    with _TAPPED_LOCK:
        cached = _TAPPED.setdefault(prepared, {}).get(key)
        if cached is None:
            cached = _TAPPED[prepared][key] = _tapped(model, prepared, layers, at_input)
    return cached


# Tapped graphs per prepared graph and layers: choosing the automatic layer runs the graph once.
# They are templates: a call runs a private working copy of one (cloning.borrowed).
_TAPPED: "weakref.WeakKeyDictionary[PreparedModel, Dict[Any, Tuple[fx.GraphModule, List[str], List[fx.Node]]]]" = (
    weakref.WeakKeyDictionary()
)
_TAPPED_LOCK = threading.RLock()


class _InputTap(nn.Module):
    """Identity over a node's tensor inputs, placed before it: Captum hooks them as the layer's inputs."""

    def forward(self, *inputs: Tensor) -> Any:
        return inputs if len(inputs) > 1 else inputs[0]


def _tapped(
    model: nn.Module, prepared: PreparedModel, layers: Sequence[Optional[LayerSpec]], at_input: bool
) -> Tuple[fx.GraphModule, List[str], List[fx.Node]]:
    """Copy the graph; for each layer, the name of the module Captum is to hook in it.

    A call of one of the user's modules is hooked as it is (its private
    copy), as Captum hooks the module itself. Any other node (a functional
    operation, an ATen operation, a token map) gets an identity tap: after
    it, or before it over its tensor inputs for ``at_input``.
    """
    source = prepared.graph_module
    architecture = prepared.architecture(model)
    nodes = [_auto_layer(architecture) if layer is None else resolve_layer(model, prepared, layer) for layer in layers]
    graph = fx.Graph()
    copies: Dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(source.graph, copies))
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    hooked: List[str] = []
    taps: Dict[str, nn.Module] = {}
    for i, (layer, node) in enumerate(zip(layers, nodes)):
        name = _TAP if len(nodes) == 1 else f"{_TAP}_{i}"
        reference = None if at_input else _grid_reference(architecture, node)
        if at_input:
            _check_called_directly(model, prepared, layer)
        if node.op == "call_module" and "replaced" not in node.meta and calls[node.target] == 1 and reference is None:
            hooked.append(str(node.target))
            continue
        hooked.append(name)
        if at_input:
            taps[name] = _tap_inputs(graph, copies[node], name)
        else:
            grid = None if reference is None else (copies[reference], architecture.token_grid_dims(reference.name))
            taps.update(_tap_output(graph, copies[node], name, *(grid or (None,))))
    owners = {
        n.target: _fetch(source, n.target)
        for n in graph.nodes
        if n.op in ("call_module", "get_attr") and n.target not in taps
    }
    gm = fx.GraphModule({**owners, **taps}, graph, type(model).__name__)
    gm.register_forward_pre_hook(shape_check(gm), with_kwargs=True)  # as the captured graph: never at other sizes
    return gm, hooked, nodes


def _check_called_directly(model: nn.Module, prepared: PreparedModel, layer: Optional[LayerSpec]) -> None:
    """A container's inputs are no one node's inputs: refuse ``attribute_to_layer_input`` for it on the graph."""
    found = None if layer is None else named_modules_for(model, layer)
    if found and id(found[0][1]) not in prepared.call_sites and next(found[0][1].children(), None) is not None:
        raise LayerResolutionError(
            f"attribute_to_layer_input at '{found[0][0]}' ({type(found[0][1]).__name__}): its inputs are those of "
            "the operations inside it, no single node's; pass modules only (Captum's own code runs on them) or "
            "name the node whose inputs you mean"
        )


def _tap_output(
    graph: fx.Graph, node: fx.Node, name: str, reference: Optional[fx.Node], grid_dims: Any = None
) -> Dict[str, nn.Module]:
    """A tap after ``node``, read by every reader of ``node``; for tokens, their grid (``reference``'s
    dimensions ``grid_dims``, see :meth:`ModelArchitecture.token_grid_dims`) and back."""
    with graph.inserting_after(node):
        if reference is None:
            tap_node = graph.call_module(name, (node,))
            last = tap_node
        else:  # tokens: the layer is their grid, put back in place for the rest of the model
            tap_node = graph.call_module(name, (node, reference))
            with graph.inserting_after(tap_node):
                last = graph.call_module(name + _UNTAP, (tap_node, node))
    node.replace_all_uses_with(last, delete_user_cb=lambda user: user not in (tap_node, last))
    if reference is None:
        return {name: Tap()}
    return {name: TokensToGrid(grid_dims), name + _UNTAP: GridToTokens()}


def _tap_inputs(graph: fx.Graph, node: fx.Node, name: str) -> nn.Module:
    """A tap before ``node`` over its tensor inputs (each occurrence, in order), which ``node`` then reads."""
    inputs: List[fx.Node] = []

    def collect(arg: fx.Node) -> fx.Node:
        if arg.op != "get_attr" and isinstance(arg.meta.get("val"), Tensor):
            inputs.append(arg)
        return arg

    fx.node.map_arg(node.args, collect)
    fx.node.map_arg(node.kwargs, collect)
    if not inputs:
        raise LayerResolutionError(f"layer '{node.meta.get('qualname', node.name)}' has no tensor input to attribute to")
    with graph.inserting_before(node):
        tap_node = graph.call_module(name, tuple(inputs))
        if len(inputs) == 1:
            outputs = [tap_node]
        else:
            outputs = [graph.call_function(operator.getitem, (tap_node, i)) for i in range(len(inputs))]
    position = iter(range(len(inputs)))

    def replace(arg: fx.Node) -> fx.Node:
        return outputs[next(position)] if arg.op != "get_attr" and isinstance(arg.meta.get("val"), Tensor) else arg

    node.args = fx.node.map_arg(node.args, replace)
    node.kwargs = fx.node.map_arg(node.kwargs, replace)
    return _InputTap()


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
    """Runs Captum on a working copy of the model, or on a tapped copy of its graph where the layer needs one."""

    _captum_class: type

    def __repr__(self) -> str:
        layer = self.layer_name or self.layer_spec or "automatic"
        return f"{type(self).__name__}(model={type(self.model_to_explain).__name__}, layer='{layer}')"

    def attribute(self, *args: Any, **kwargs: Any) -> Any:
        """See the Captum method of the same class.

        Modules (or their names) as the layer: Captum's own code on a working
        copy of the model. Graph nodes or the automatic layer: the graph is
        captured at ``inputs``.
        """
        model = self.model_to_explain
        if not isinstance(model, nn.Module):  # a plain function: nothing to copy, Captum's code as it is
            self.layer_name = None
            return self._delegate(model, self.layer_spec).attribute(*args, **kwargs)
        inner, specs = _inside_wrappers(model, self.layer_spec)
        modules = named_modules_for(inner, specs)
        if modules is None:
            return self._attribute_on_graph(*args, **kwargs)
        bound = self._bound(args, kwargs)
        copy = working_copy(inner)
        layers = [copy.get_submodule(name) for name, _ in modules]
        self.layer_name = _as_given(self.layer_spec, [name for name, _ in modules])
        return self._delegate(copy, _as_given(self.layer_spec, layers)).attribute(*bound.args[1:], **bound.kwargs)

    def _attribute_on_graph(self, *args: Any, **kwargs: Any) -> Any:
        """Captum on a working copy of the graph captured at ``inputs``, tapped at the layer's node(s)."""
        bound = self._bound(args, kwargs)
        inputs = bound.arguments["inputs"]
        additional = bound.arguments.get("additional_forward_args")
        at_input = bool(bound.arguments.get("attribute_to_layer_input", False))
        specs = self.layer_spec if isinstance(self.layer_spec, list) else [self.layer_spec]
        gm, hooked, nodes = _tapped_graph(self.model_to_explain, specs, inputs, additional, at_input)
        self.layer_name = _as_given(self.layer_spec, [node.meta.get("qualname", node.name) for node in nodes])
        with borrowed(gm) as working:  # Captum's hooks go on this call's own copy
            _with_gradients(working)
            layers = [working.get_submodule(name) for name in hooked]
            return self._delegate(working, _as_given(self.layer_spec, layers)).attribute(*bound.args[1:], **bound.kwargs)

    def _bound(self, args: tuple, kwargs: dict) -> inspect.BoundArguments:
        """The call's arguments bound to Captum's signature; its inputs checked and aliased.

        Captum toggles ``requires_grad`` on its inputs during a call: on aliases,
        never on the caller's tensors, which another thread may be using.
        """
        bound = inspect.signature(self._captum_class.attribute).bind(self, *args, **kwargs)
        check_finite_inputs(call_arguments(bound.arguments["inputs"]))
        bound.arguments["inputs"] = input_aliases(bound.arguments["inputs"])
        return bound

    def _delegate(self, model: Any, layer: Any) -> Any:
        return self._captum_class(model, layer, *self._init_args, **self._init_kwargs)


def _inside_wrappers(model: nn.Module, layers: Layers) -> Tuple[nn.Module, Layers]:
    """The model inside its wrappers (``torch.compile``, DataParallel) and the layers named inside it."""
    if not isinstance(layers, list):
        return unwrap_layer(model, layers)
    inside = [unwrap_layer(model, layer) for layer in layers]
    return (inside[0][0] if inside else unwrap(model)), [layer for _, layer in inside]


def _as_given(spec: Layers, values: List[Any]) -> Any:
    """``values`` as a list where the layer was given as a list, else its only element."""
    return values if isinstance(spec, list) else values[0]


def _graph_layer_class(captum_class: type, doc: str) -> type:
    def __init__(self, model: nn.Module, layer: Layers = None, *args: Any, **kwargs: Any) -> None:
        for spec in layer if isinstance(layer, list) else [] if layer is None else [layer]:
            if isinstance(model, nn.Module):
                check_layer_spec(model, spec)
            elif not isinstance(spec, nn.Module):
                raise LayerResolutionError(
                    f"layer {spec!r} is a name, which needs the model as an nn.Module; "
                    f"got a {type(model).__name__} as the forward function: pass the module itself"
                )
        modules = layer if isinstance(layer, nn.Module) or (
            isinstance(layer, list) and layer and all(isinstance(spec, nn.Module) for spec in layer)
        ) else None
        captum_class.__init__(self, model, modules, *args, **kwargs)
        self.model_to_explain = model
        self.layer_spec = layer
        self.layer_name: Union[None, str, List[str]] = None  # the module or node chosen, known after a call
        self._init_args, self._init_kwargs = args, kwargs

    return type(
        captum_class.__name__,
        (_GraphLayerMixin, captum_class),
        {"__init__": __init__, "__doc__": doc, "__module__": __name__, "_captum_class": captum_class},
    )


_DOC = """Captum's ``{name}``; ``layer`` may also be a graph node.

Same arguments and return shapes as :class:`captum.attr.{name}`. ``layer``
may be a module, a module's qualified name (``"layer4"``), a graph node's
qualified or fx name (``"layer4.1.add"``, ``"add_7"``), so functional
operations can be targets{lists}.{extra}

A module (or a module's name) runs Captum's own code on a private working
copy of the model, bit for bit Captum's result: a module called at several
places behaves as in Captum (its hooks fire at every call); name one call's
node (``"layer1.0.relu_1"``) to attribute to that call alone. A graph node
captures the graph at each call's inputs. The chosen module or node is in
``layer_name`` after a call.
"""
_LISTS = ", or a list of these (as Captum accepts a list of modules)"

LayerGradCam = _graph_layer_class(
    _LayerGradCam,
    _DOC.format(
        name="LayerGradCam",
        lists="",
        extra=" With ``layer`` omitted the graph picks the last feature map with spatial "
        "extent, before global pooling, that every path to the output passes through.",
    ),
)
LayerActivation = _graph_layer_class(_LayerActivation, _DOC.format(name="LayerActivation", lists=_LISTS, extra=""))
LayerGradientXActivation = _graph_layer_class(
    _LayerGradientXActivation, _DOC.format(name="LayerGradientXActivation", lists=_LISTS, extra="")
)
LayerIntegratedGradients = _graph_layer_class(
    _LayerIntegratedGradients, _DOC.format(name="LayerIntegratedGradients", lists=_LISTS, extra="")
)
LayerConductance = _graph_layer_class(_LayerConductance, _DOC.format(name="LayerConductance", lists="", extra=""))
LayerDeepLift = _graph_layer_class(_LayerDeepLift, _DOC.format(name="LayerDeepLift", lists="", extra=""))
GuidedGradCam = _graph_layer_class(_GuidedGradCam, _DOC.format(name="GuidedGradCam", lists="", extra=""))
