"""From the user's model and a call's inputs to an LRP-ready GraphModule, cached."""
import functools
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn

from .architecture import ModelArchitecture
from .capture import capture
from .cloning import borrowed, private_copy
from .passes import (
    CONSTANT_INPUT,
    calls_to_modules,
    elementwise_functions_to_modules,
    fold_batch_norms,
    functional_to_modules,
    is_torch_layer,
    qualify_names,
    registered_leaf_modules,
    remove_inplace,
    takes_one_tensor,
    unshare_modules,
    views_to_reshapes,
)
from .rules import has_default_rule

__all__ = ["PreparedModel", "prepare", "rewrite_passes", "default_example_inputs", "unwrap", "unwrap_layer"]

#: Cached graphs per model (least recently used dropped beyond this).
CACHE_SIZE = 8


@dataclass(eq=False)  # identity: a cache key for graphs derived from it
class PreparedModel:
    """The rewritten graph of a model at one input signature, and where its modules are called.

    Attributes:
        graph_module: the rewritten graph; one placeholder per positional
            argument of the call. Its modules are private copies that share
            parameter storage with the user's model. Shared by every call
            at this signature, from any thread: read it, and run it only
            through :meth:`borrow`.
        call_sites: for each user module (by ``id``), the graph nodes calling it.
        model_copy: the private copy of the model the graph was captured from.
        origins: for each ``call_module`` target standing for a user module, a
            weak reference to that module (where a ``rule`` attribute is read).
        input_shapes: ``(shape, dtype)`` of each tensor argument of the
            captured call (``None`` for other arguments).
        dynamic_batch: the graph runs at any batch size.
        path_specific: captured along the branch these inputs take (not cached).
    """

    graph_module: fx.GraphModule
    call_sites: Dict[int, List[fx.Node]] = field(default_factory=dict)
    model_copy: nn.Module = None
    origins: Dict[str, "weakref.ref[nn.Module]"] = field(default_factory=dict)
    input_shapes: Tuple[Optional[Tuple[torch.Size, torch.dtype]], ...] = ()
    dynamic_batch: bool = False
    path_specific: bool = False

    def borrow(self) -> ContextManager[fx.GraphModule]:
        """``with prepared.borrow() as gm:`` a private working copy of :attr:`graph_module` for one call.

        A call installs its hooks and swapped forwards on ``gm`` and removes
        them before the block ends; sequential calls reuse one copy, calls
        running at the same time get one each (see :func:`captum_graph.cloning.borrowed`).
        """
        return borrowed(self.graph_module)

    def architecture(self, model: Optional[nn.Module] = None) -> ModelArchitecture:
        """A :class:`ModelArchitecture` view of the rewritten graph, with example inputs of its shapes.

        ``model``: the user's model (or a wrapper of it), whose container modules the view then returns.
        """
        architecture = ModelArchitecture(self.graph_module.graph, unwrap(model) if model is not None else self.model_copy)
        architecture.example_inputs = self.example_inputs()
        return architecture

    def example_inputs(self) -> Tuple[Any, ...]:
        """Random tensors shaped like the captured call's tensor arguments (``None`` for the others)."""
        generator = torch.Generator().manual_seed(0)
        device = next((p.device for p in self.graph_module.parameters()), torch.device("cpu"))
        return tuple(
            None if spec is None else _random(spec[0], spec[1], generator).to(device) for spec in self.input_shapes
        )


def _random(shape: torch.Size, dtype: torch.dtype, generator: torch.Generator) -> Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


_CACHE: "weakref.WeakKeyDictionary[nn.Module, OrderedDict]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()
# torch.export patches process-wide state while it traces: one capture at a time. Held while
# preparing, so that threads missing the cache together capture once and share the result.
_PREPARE_LOCK = threading.RLock()


def prepare(
    model: nn.Module,
    inputs: Optional[Sequence[Any]] = None,
    fold_batch_norm: bool = False,
    any_batch: bool = False,
    explained: Optional[int] = None,
) -> PreparedModel:
    """Capture ``model(*inputs)`` and run every rewrite pass; cached until the model changes.

    ``inputs`` are the call's positional arguments (Captum's ``inputs``
    followed by ``additional_forward_args``); ``None`` takes an image batch
    for the model's first convolution (:func:`default_example_inputs`).
    With ``fold_batch_norm``, eval-mode batch norms are also merged into the
    convolution or linear layer before them (:func:`fold_batch_norms`).
    ``any_batch``: the graph will also be run at other batch sizes (see
    :func:`captum_graph.capture.capture`). ``explained``: only the first
    this many arguments are explained (Captum's ``inputs``); LRP holds the
    others constant (``additional_forward_args``: a division by one is a
    scaling), ``None`` explains them all.

    The cache is keyed by the model and the inputs' signature (dtypes,
    devices, shapes but the batch size where the graph allows any, and the
    values of non-tensor arguments), and checked against the model's module
    structure, ``training`` flags and parameters (identity and storage):
    replacing a submodule or a parameter, rebinding ``.data`` or switching
    ``eval()``/``train()`` prepares again. Values written in place (an
    optimiser step) are seen by the graph, which shares the storage; with
    ``fold_batch_norm`` they prepare again too (folding bakes them in). A graph
    captured along a data-dependent branch is never reused.
    """
    model = unwrap(model)
    args = tuple(default_example_inputs(model) if inputs is None else inputs)
    explained = None if explained is None or explained >= len(args) else explained  # one cache entry when all are
    fingerprint = _fingerprint(model, values=fold_batch_norm)
    # A dynamic graph holds for batches of two and more (export's assumption), unless any batch will
    # do; a fixed-batch graph serves any_batch callers only where it was captured for them.
    keys = [_signature(args, "fixed, for any batch" if any_batch else "fixed", fold_batch_norm, explained)]
    if any_batch or not _has_batch_of_one(args):
        keys.insert(0, _signature(args, "dynamic", fold_batch_norm, explained))
    cached = _cached(model, keys, fingerprint)
    if cached is not None:
        return cached
    with _PREPARE_LOCK:
        cached = _cached(model, keys, fingerprint)  # another thread may have prepared it meanwhile
        if cached is not None:
            return cached
        prepared = _prepare(model, args, fold_batch_norm, any_batch, explained)
        if not prepared.path_specific:
            with _CACHE_LOCK:
                entries = _CACHE.setdefault(model, OrderedDict())
                batch = "dynamic" if prepared.dynamic_batch else "fixed, for any batch" if any_batch else "fixed"
                entries[_signature(args, batch, fold_batch_norm, explained)] = (fingerprint, prepared)
                while len(entries) > CACHE_SIZE:
                    entries.popitem(last=False)
    return prepared


def _cached(model: nn.Module, keys: Sequence[tuple], fingerprint: tuple) -> Optional[PreparedModel]:
    with _CACHE_LOCK:
        entries = _CACHE.setdefault(model, OrderedDict())
        for key in keys:
            cached = entries.get(key)
            if cached is not None and cached[0] == fingerprint:
                entries.move_to_end(key)
                return cached[1]
    return None


def _has_batch_of_one(args: Sequence[Any]) -> bool:
    return any(isinstance(a, Tensor) and a.dim() and a.shape[0] == 1 for a in args)


def _wrapped(model: nn.Module) -> Optional[str]:
    """The attribute under which a ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel``
    wrapper holds its model; ``None`` for any other module."""
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        return "_orig_mod"
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return "module"
    return None


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers
    (any nesting of them); ``model`` itself if it is none of these."""
    return unwrap_layer(model, None)[0]


def unwrap_layer(model: nn.Module, layer: Union[str, nn.Module, None]) -> Tuple[nn.Module, Union[str, nn.Module, None]]:
    """The wrapped model (see :func:`unwrap`) and ``layer`` named inside it.

    A name given through the wrappers (``"_orig_mod.layer1"``,
    ``"module.layer1"``) loses their prefixes; a plain name (``"layer1"``) and a
    module are returned as they are.
    """
    attribute = _wrapped(model)
    while attribute is not None:
        if isinstance(layer, str) and layer.startswith(attribute + "."):
            layer = layer[len(attribute) + 1 :]
        model = model.__dict__["_modules"][attribute]  # not getattr: a wrapper may forward attribute reads
        attribute = _wrapped(model)
    return model, layer


def default_example_inputs(model: nn.Module) -> Tuple[Tensor]:
    """One random example for the model's first convolution or linear layer.

    An image at the model's ``image_size`` (else 224x224) for a 2-D
    convolution, a sequence of 64 steps for a 1-D one, a vector for a linear
    layer. A guess for when no inputs are at hand: pass real ones where you can.

    Raises:
        ValueError: the model has none of these layers: pass the inputs.
    """
    for module in model.modules():
        shape = _example_shape(model, module)
        if shape is not None:
            generator = torch.Generator().manual_seed(0)  # random, so gradients are not degenerate
            example = torch.randn(shape, generator=generator, dtype=module.weight.dtype)
            return (example.to(module.weight.device),)
    raise ValueError(
        f"{type(model).__name__} has no convolution or linear layer to make an example input for; "
        "pass example inputs (the graph is captured at real inputs)"
    )


def _example_shape(model: nn.Module, module: nn.Module) -> Optional[Tuple[int, ...]]:
    if isinstance(module, nn.Conv2d):
        size = getattr(model, "image_size", 224)
        return (1, module.in_channels) + (tuple(size) if isinstance(size, (tuple, list)) else (size, size))
    if isinstance(module, nn.Conv1d):
        return (1, module.in_channels, 64)
    if isinstance(module, nn.Linear):
        return (1, module.in_features)
    return None


def _signature(args: Sequence[Any], batch: str, fold_batch_norm: bool, explained: Optional[int] = None) -> tuple:
    parts: List[Any] = [fold_batch_norm, batch, explained]
    for arg in args:
        if isinstance(arg, Tensor):
            shape = tuple(arg.shape[1:]) if batch == "dynamic" and arg.dim() else tuple(arg.shape)
            parts.append(("tensor", arg.dtype, arg.device, arg.dim(), shape))
        else:
            parts.append(("value", _hashable(arg)))
    return tuple(parts)


def _hashable(value: Any) -> Any:
    try:
        hash(value)
        return (type(value), value)
    except TypeError:
        return (type(value), repr(value))


def _is_leaf(module: nn.Module) -> bool:
    if isinstance(module, registered_leaf_modules()):
        return True
    return is_torch_layer(module) and takes_one_tensor(module) and has_default_rule(module)


def rewrite_passes(model_copy: nn.Module, fold_batch_norm: bool = False) -> Tuple[Callable[[fx.GraphModule], bool], ...]:
    """The passes :func:`prepare` runs, in order, on a graph captured from ``model_copy``."""
    return (
        remove_inplace,
        views_to_reshapes,
        functools.partial(calls_to_modules, model=model_copy, is_leaf=_is_leaf),
        qualify_names,
        unshare_modules,
        elementwise_functions_to_modules,
        functional_to_modules,
    ) + ((fold_batch_norms,) if fold_batch_norm else ())


def _prepare(
    model: nn.Module, args: Tuple[Any, ...], fold_batch_norm: bool, any_batch: bool, explained: Optional[int]
) -> PreparedModel:
    names = {id(module): name for name, module in model.named_modules(remove_duplicate=False)}
    user_modules = {id(module): module for module in model.modules()}
    copy = private_copy(model)
    gm = capture(copy, args, any_batch=any_batch)
    graph_module = gm.graph_module
    for placeholder in graph_module.graph.find_nodes(op="placeholder")[len(args) if explained is None else explained :]:
        placeholder.meta[CONSTANT_INPUT] = True
    for run_pass in rewrite_passes(copy, fold_batch_norm):
        run_pass(graph_module)
    copies = {name: module for name, module in copy.named_modules(remove_duplicate=False)}
    by_copy = {id(copies[name]): user_id for user_id, name in names.items() if name in copies}
    call_sites: Dict[int, List[fx.Node]] = {}
    origins: Dict[str, weakref.ref] = {}
    for node in graph_module.graph.find_nodes(op="call_module"):
        if "replaced" in node.meta:
            continue  # a module standing for a functional operation
        stack = node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else node.target
        user_id = by_copy.get(id(copies.get(path)))
        if user_id is not None:
            call_sites.setdefault(user_id, []).append(node)
            origins[str(node.target)] = weakref.ref(user_modules[user_id])
    shapes = tuple((a.shape, a.dtype) if isinstance(a, Tensor) else None for a in args)
    return PreparedModel(graph_module, call_sites, copy, origins, shapes, gm.dynamic_batch, gm.path_specific)


def _fingerprint(model: nn.Module, values: bool) -> tuple:
    """What a prepared graph depends on: structure, flags, parameter identity and storage.

    The graph shares parameter and buffer storage with the model, so new
    values written in place (an optimiser step) are seen without preparing
    again; only a graph that bakes values in (folded batch norms, ``values``)
    also depends on their in-place version.
    """
    return (frozenset(registered_leaf_modules()),) + tuple(
        (
            id(module),
            module.training,
            tuple((id(p), p.data_ptr()) + ((p._version,) if values else ()) for p in module._parameters.values() if p is not None),
            tuple((id(b), b.data_ptr()) + ((b._version,) if values else ()) for b in module._buffers.values() if b is not None),
        )
        for module in model.modules()
    )
