"""Capturing a model's graph at a call's own inputs with ``torch.export``.

The result is an fx GraphModule of ATen operations (``aten.conv2d``,
``aten.add_``, ...) whose placeholders are the call's positional arguments
and whose parameters are ``get_attr`` nodes. Every node carries
``meta["nn_module_stack"]`` (the module calls it happened in, with the
model's own paths), ``meta["val"]``/``meta["tensor_meta"]`` (real shapes) and
``meta["stack_trace"]``. Python control flow on non-tensor values is resolved
by the capture; control flow on tensor values is captured along the path this
call takes (``torch.export.draft_export``), and such a graph is not reused.
"""
import contextlib
import dataclasses
import inspect
import logging
import operator
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.export.graph_signature import OutputKind
from torch.fx.experimental.symbolic_shapes import free_symbols
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import CaptureError, error_class, user_frame

__all__ = ["Captured", "capture", "main_output", "shape_check", "preserved_training_flags"]

_ROOT = "model"  # the attribute under which the capture wrapper holds the model
# reason: torch.export's nn_module_stack entry for nodes made outside any module
# (sym_size of a dynamic batch); fragile coupling to a private name, tested
_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


@dataclasses.dataclass(frozen=True)
class Captured:
    """A captured graph and how far it may be reused.

    Attributes:
        graph_module: ATen-level graph; one placeholder per positional argument.
        dynamic_batch: the first dimension of the tensor inputs is symbolic,
            so the graph runs at any batch size.
        path_specific: the forward branches on tensor values; the graph holds
            the path of the captured inputs only and must not be reused.
    """

    graph_module: fx.GraphModule
    dynamic_batch: bool
    path_specific: bool


class _Call(nn.Module):
    """Calls ``model`` with the captured call's non-tensor arguments fixed; takes its tensors."""

    def __init__(self, model: nn.Module, args: Sequence[Any], kwargs: Dict[str, Any]) -> None:
        super().__init__()
        setattr(self, _ROOT, model)
        self.leaves, self.spec = tree_flatten((tuple(args), dict(kwargs)))
        self.tensor_positions = [i for i, leaf in enumerate(self.leaves) if isinstance(leaf, Tensor)]

    def forward(self, *tensors: Tensor) -> Any:
        leaves = list(self.leaves)
        for position, tensor in zip(self.tensor_positions, tensors):
            leaves[position] = tensor
        args, kwargs = tree_unflatten(leaves, self.spec)
        return main_output(getattr(self, _ROOT)(*args, **kwargs))


def main_output(output: Any) -> Any:
    """The output Captum explains: a tensor as it is; of a tuple, list or mapping, the first tensor.

    A Hugging Face model returns a ``ModelOutput`` (a mapping of its non-``None``
    fields, ``logits`` first when no labels are given) or, with
    ``return_dict=False``, a tuple: the first tensor is what ``outputs[0]``
    gives there. The rest (caches, hidden states, attention maps, auxiliary
    heads) is not part of the captured graph.
    """
    if isinstance(output, Tensor):
        return output
    values = output.values() if isinstance(output, Mapping) else output if isinstance(output, (tuple, list)) else ()
    first = next((value for value in values if isinstance(value, Tensor)), None)
    if first is None:
        raise CaptureError(
            f"the model returned {type(output).__name__}, which holds no tensor; "
            "captum_graph explains a tensor output (or the first tensor of a tuple or mapping)"
        )
    return first


def capture(
    model: nn.Module, args: Sequence[Any], kwargs: Optional[Dict[str, Any]] = None, any_batch: bool = False
) -> Captured:
    """Capture ``model(*args, **kwargs)`` as an ATen graph (see the module docstring).

    ``model`` is run under export, so pass a private copy (``cloning.private_copy``).
    Tensors among ``args`` become the graph's inputs; every other argument
    (``None``, numbers, flags) and ``kwargs`` (which may not hold tensors) are
    fixed at their values. The first dimension of the tensors is made dynamic where the model
    allows it, except for a batch of one: export assumes a dynamic size is
    never one, so that graph would hold for two and more only (a forward may
    branch on ``x.shape[0] == 1``). With ``any_batch`` a batch of one is
    captured at two all the same, for callers that run the graph at other
    batch sizes (Captum's layer methods batch steps and baselines). The graph
    refuses inputs of other shapes than it was captured for. The graph returns
    the model's :func:`main_output` (a tensor; the first one of a tuple or a
    Hugging Face ``ModelOutput``).

    Raises:
        CaptureError: torch.export cannot capture the model; says why, at which
            line of the user's source, and what to do. It is also an instance of
            the exception type export raised.
    """
    nested = [i for i, arg in enumerate(args) if not isinstance(arg, Tensor) and _holds_tensors(arg)]
    nested += [name for name, value in (kwargs or {}).items() if _holds_tensors(value)]
    if nested:
        raise CaptureError(
            f"argument {nested[0]!r} of the call holds tensors inside a container or as a keyword; "
            "captum_graph captures tensors passed as positional arguments: pass them one by one"
        )
    call = _Call(model, args, kwargs or {})
    tensors = tuple(call.leaves[i] for i in call.tensor_positions)
    with preserved_training_flags(model), _quiet_export_logs():
        exported, path_specific = _export(call, tensors, any_batch)
    graph_module, dynamic = _flat_graph_module(exported, model, args)
    graph_module.register_forward_pre_hook(shape_check(graph_module), with_kwargs=True)
    return Captured(graph_module, dynamic, path_specific)


def _holds_tensors(value: Any) -> bool:
    return any(isinstance(leaf, Tensor) for leaf in tree_flatten(value)[0])


def _export(call: _Call, tensors: Tuple[Tensor, ...], any_batch: bool):
    """``torch.export`` with a dynamic batch where wanted; the taken path on data-dependent branches.

    A graph whose batch size export fixed is captured at the call's own tensors.
    """
    single = any(t.dim() and t.shape[0] == 1 for t in tensors)
    examples = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in tensors)
    dynamic = (tuple({0: torch.export.Dim.AUTO} if t.dim() else None for t in examples),)
    if any_batch or not single:
        try:
            exported = torch.export.export(call, examples, dynamic_shapes=dynamic, strict=False)
            if _batch_is_symbolic(exported) or not single:
                return exported, False
        except Exception:  # noqa: BLE001 - a fixed batch may still work; its error is the one to show
            pass
    try:
        return torch.export.export(call, tensors, strict=False), False
    except Exception as error:  # noqa: BLE001
        if not _is_data_dependent(error):
            raise _capture_error(error, call) from error
    try:
        return torch.export.draft_export(call, tensors, strict=False), True
    except Exception as error:  # noqa: BLE001
        raise _capture_error(error, call) from error


def _batch_is_symbolic(exported) -> bool:
    inputs = set(exported.graph_signature.user_inputs)
    return any(_has_symbolic_batch(node) for node in exported.graph.nodes if node.op == "placeholder" and node.name in inputs)


def _is_data_dependent(error: BaseException) -> bool:
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    while error is not None:
        if isinstance(error, GuardOnDataDependentSymNode) or "data-dependent" in str(error)[:2000].lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def _capture_error(error: Exception, call: _Call) -> CaptureError:
    model = getattr(call, _ROOT)
    lines = [f"torch.export cannot capture {type(model).__qualname__}: {_first_lines(error)}"]
    frame = user_frame(error)
    if frame is not None:
        lines.append(f"  at {frame}")
    lines.append(
        "To fix it: make the forward traceable by torch.export (see the torch.export "
        "programming model), or explain a submodule that is."
    )
    return error_class(CaptureError, type(error))("\n".join(lines))


def _first_lines(error: Exception, count: int = 6) -> str:
    text = str(error).strip().splitlines()
    return "\n".join(text[:count]) if text else type(error).__name__


@contextlib.contextmanager
def _quiet_export_logs() -> Iterator[None]:
    """draft_export and the symbolic-shape engine log warnings meant for export authors."""
    loggers = [logging.getLogger(name) for name in ("torch.export", "torch.fx.experimental.symbolic_shapes", "torch._export", "torch._subclasses.fake_tensor")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _flat_graph_module(exported, model: nn.Module, args: Sequence[Any]) -> Tuple[fx.GraphModule, bool]:
    """The exported graph with parameters as ``get_attr`` and one placeholder per call argument."""
    graph = fx.Graph()
    old_graph = exported.graph_module.graph
    signature = exported.graph_signature
    lifted = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    constants = signature.inputs_to_lifted_tensor_constants
    attributes: Dict[str, Any] = {}
    names = _argument_names(model, len(args))
    tensor_inputs = iter(i for i, a in enumerate(args) if isinstance(a, Tensor))
    placeholders = [graph.placeholder(name) for name in names]
    env: Dict[fx.Node, fx.Node] = {}
    dynamic = False
    for node in old_graph.nodes:
        if node.op == "placeholder":
            if node.name in lifted:
                target = _strip_root(lifted[node.name])
                attributes[target] = _fetch(model, target)
                env[node] = graph.get_attr(target)
            elif node.name in constants:
                target = f"_captured_constants.{node.name}"
                attributes[target] = exported.constants[constants[node.name]]
                env[node] = graph.get_attr(target)
            else:
                env[node] = placeholders[next(tensor_inputs)]
                dynamic = dynamic or _has_symbolic_batch(node)
            env[node].meta = _clean_meta(node.meta)
        elif node.op == "output":
            user = [o for o, spec in zip(node.args[0], signature.output_specs) if spec.kind == OutputKind.USER_OUTPUT]
            outputs = [env[o] if isinstance(o, fx.Node) else o for o in user]
            graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
        elif node.target is torch.ops.higher_order.wrap_with_autocast:
            env[node] = _inline(graph, getattr(exported.graph_module, node.args[4].target), node.args[5:], env)
        elif node.target is operator.getitem and isinstance(env.get(node.args[0]), tuple):
            env[node] = env[node.args[0]][node.args[1]]  # an output of an inlined region
        else:
            if node.op == "get_attr":  # a region of a higher-order operator left as it is
                attributes[node.target] = getattr(exported.graph_module, node.target)
            env[node] = graph.node_copy(node, lambda n: env[n])
            env[node].meta = _clean_meta(node.meta)
    return fx.GraphModule(attributes, graph, type(model).__name__), dynamic


def _inline(graph: fx.Graph, region: fx.GraphModule, operands: Sequence[Any], env: Dict[fx.Node, Any]) -> tuple:
    """Copy an autocast region's operations into ``graph``; return its outputs.

    LRP runs without autocast, where the region computes what its operations do.
    """
    inner: Dict[fx.Node, Any] = {}
    placeholders = iter(operands)
    for node in region.graph.nodes:
        if node.op == "placeholder":
            operand = next(placeholders)
            inner[node] = env[operand] if isinstance(operand, fx.Node) else operand
        elif node.op == "output":
            return tuple(inner[o] if isinstance(o, fx.Node) else o for o in node.args[0])
        else:
            inner[node] = graph.node_copy(node, lambda n: inner[n])
            inner[node].meta = _clean_meta(node.meta)
    raise CaptureError("an autocast region of the captured graph has no output")


def _argument_names(model: nn.Module, count: int) -> list:
    try:
        parameters = [
            p.name for p in inspect.signature(model.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        parameters = []
    return [parameters[i] if i < len(parameters) else f"input_{i}" for i in range(count)]


def _has_symbolic_batch(node: fx.Node) -> bool:
    value = node.meta.get("val")
    return isinstance(value, Tensor) and value.dim() > 0 and _is_symbolic(value.shape[0])


def shape_check(graph_module: fx.GraphModule):
    """A pre-hook for ``graph_module`` (a captured graph or a copy of one) refusing inputs whose fixed
    sizes differ from the captured ones: no silent broadcast."""
    expected = [
        (i, node.target, tuple(None if _is_symbolic(d) else int(d) for d in node.meta["val"].shape))
        for i, node in enumerate(graph_module.graph.find_nodes(op="placeholder"))
        if isinstance(node.meta.get("val"), Tensor)
    ]
    model_name = graph_module.__class__.__name__  # not the module: its working copies get this hook

    def check(module, args, kwargs):
        for i, name, shape in expected:
            value = args[i] if i < len(args) else kwargs.get(name)
            if not isinstance(value, Tensor):
                continue  # not a tensor yet: a hook registered later (Captum's DeepLift) builds it
            given = value.shape
            if len(given) != len(shape) or any(s is not None and s != g for s, g in zip(shape, given)):
                raise CaptureError(
                    f"the graph of {model_name} was captured for argument {i} of shape "
                    f"{_shape_text(shape)}; it is called with {tuple(given)}. "
                    "Call captum_graph with inputs of the shape you explain (it captures again for a new shape)."
                )

    return check


def _is_symbolic(size: Any) -> bool:
    """A size export left free (a specialised ``SymInt`` is a number in disguise)."""
    return isinstance(size, torch.SymInt) and bool(free_symbols(size))


def _shape_text(shape: Tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("batch" if s is None else str(s) for s in shape) + ")"


def _strip_root(path: str) -> str:
    return path[len(_ROOT) + 1 :] if path.startswith(_ROOT + ".") else path


def _fetch(root: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def _clean_meta(meta: Dict[str, Any]) -> Dict[str, Any]:
    """``meta`` with module paths relative to the user's model and the wrapper left out."""
    kept = {key: meta[key] for key in ("val", "tensor_meta", "stack_trace", "torch_fn") if key in meta}
    stack = {}
    for key, (path, module_type) in (meta.get("nn_module_stack") or {}).items():
        if path in ("", _ROOT) or key == _NO_MODULE:
            continue  # the wrapper, the model itself, export's stand-in for no module: top level
        stack[key] = (_strip_root(path), module_type)
    kept["nn_module_stack"] = stack
    return kept


@contextlib.contextmanager
def preserved_training_flags(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, whatever happened."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.__dict__["training"] = training  # not setattr: a module's own __setattr__ may forward it
