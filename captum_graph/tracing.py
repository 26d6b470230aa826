"""torch.fx tracing that records where every node came from.

Every node gets ``node.meta["qualname"]``: the qualified name of the module
call it stands for (``layer1.0.conv1``, ``layer1.0.relu_1`` for a second call)
or of the functional operation inside its owning module (``layer1.0.add``).
"""
import contextlib
import linecache
import operator
import os
import re
import sys
import traceback
from typing import Any, Callable, Dict, Iterator, Optional, Set, Tuple, Type

import torch
import torch.fx as fx
from torch import nn

from .errors import tracing_error_class

__all__ = [
    "QualnameTracer",
    "trace",
    "register_leaf_module",
    "register_leaf_function",
    "registered_leaf_modules",
    "registered_leaf_functions",
]

_LEAF_MODULES: Set[Type[nn.Module]] = set()
_LEAF_FUNCTIONS: Set[Callable] = set()


def register_leaf_module(module_class: Type[nn.Module]) -> Type[nn.Module]:
    """Keep instances of ``module_class`` as single nodes (not traced into).

    Usable as a class decorator. A leaf module needs a relevance rule of its own
    (see :func:`captum_graph.register_rule`) unless it is pass-through.
    """
    _LEAF_MODULES.add(module_class)
    return module_class


def register_leaf_function(function: Callable) -> Callable:
    """Record calls of ``function`` as single nodes instead of tracing into it.

    The function must be reachable as a global of the module that calls it, as
    for ``torch.fx.Tracer(autowrap_functions=...)``. Usable as a decorator.
    """
    _LEAF_FUNCTIONS.add(function)
    return function


def registered_leaf_modules() -> Tuple[Type[nn.Module], ...]:
    """The module classes kept as leaves: registered ones, torchvision.ops, timm's."""
    return tuple(_LEAF_MODULES) + _third_party_leaf_modules()


def registered_leaf_functions() -> Tuple[Callable, ...]:
    """The functions recorded as single nodes: registered ones and timm's."""
    return tuple(_LEAF_FUNCTIONS) + _third_party_leaf_functions()


def _third_party_leaf_modules() -> Tuple[Type[nn.Module], ...]:
    found = []
    ops = sys.modules.get("torchvision.ops")
    if ops is not None:
        # reason: torchvision.ops layers use data-dependent control flow
        found += [ops.DeformConv2d, ops.RoIAlign, ops.RoIPool, ops.PSRoIAlign, ops.PSRoIPool]
    timm_fx = _timm_fx()
    if timm_fx is not None:
        found += list(getattr(timm_fx, "_leaf_modules", ()))
    return tuple(found)


def _third_party_leaf_functions() -> Tuple[Callable, ...]:
    timm_fx = _timm_fx()
    if timm_fx is None:
        return ()
    return tuple(getattr(timm_fx, "_autowrap_functions", ()))


def _timm_fx():
    if "timm" not in sys.modules:
        return None
    for name in ("timm.layers._fx", "timm.models._features_fx"):
        with contextlib.suppress(ImportError):
            return __import__(name, fromlist=["_leaf_modules"])
    return None


class QualnameTracer(fx.Tracer):
    """An ``fx.Tracer`` that records each node's qualified name and source line.

    Args:
        leaf_modules: module classes to keep as leaves, besides the registered ones.
        leaf_functions: functions to record as single nodes, besides the registered ones.
        record_inplace: record ``a += b`` as ``operator.iadd`` (exact when another
            name refers to ``a``) instead of fx's ``operator.add``.
    """

    def __init__(
        self,
        leaf_modules: Tuple[Type[nn.Module], ...] = (),
        leaf_functions: Tuple[Callable, ...] = (),
        record_inplace: bool = False,
    ) -> None:
        super().__init__(autowrap_functions=tuple(leaf_functions) + registered_leaf_functions())
        self._leaf_types = tuple(leaf_modules) + registered_leaf_modules()
        self._record_inplace = record_inplace
        self._module_path = ""
        self.module_path_stack = []
        self._used_qualnames: Dict[str, int] = {}

    def trace(self, root, concrete_args=None) -> fx.Graph:
        graph = super().trace(root, concrete_args)
        for node in graph.find_nodes(op="output"):
            node.meta.setdefault("qualname", node.name)
        return graph

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name) or _inherits_torch_leaf_forward(m)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _InplaceProxy(node, self) if self._record_inplace else super().proxy(node)

    def call_module(self, m: nn.Module, forward: Callable, args: Tuple, kwargs: Dict) -> Any:
        outer = self._module_path
        self._module_path = self.path_of_module(m)
        # Left unpopped when the call raises, so the stack names the failing module.
        self.module_path_stack.append(self._module_path)
        try:
            result = super().call_module(m, forward, args, kwargs)
        finally:
            self._module_path = outer
        self.module_path_stack.pop()
        return result

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        proxy.node.meta["qualname"] = self._unique_qualname(self._qualname(proxy.node))
        if not proxy.node.stack_trace:
            proxy.node.stack_trace = _innermost_user_frame()
        return proxy

    def _qualname(self, node: fx.Node) -> str:
        if node.op in ("call_module", "get_attr"):
            return str(node.target)
        if node.op in ("placeholder", "output") or not self._module_path:
            return node.name  # top level: fx's own name, unique in the graph
        if node.op == "call_method":  # x.add_(y) reads as 'add', like x.add(y)
            base = node.target[:-1] if node.target.endswith("_") and not node.target.startswith("_") else node.target
        else:
            base = _PLAIN_NAMES.get(node.target) or getattr(node.target, "__name__", None)
        base = base or re.sub(r"_\d+$", "", node.name)
        return f"{self._module_path}.{base}"

    def _unique_qualname(self, qualname: str) -> str:
        count = self._used_qualnames.get(qualname, 0)
        self._used_qualnames[qualname] = count + 1
        return qualname if count == 0 else f"{qualname}_{count}"


def _inherits_torch_leaf_forward(m: nn.Module) -> bool:
    """A subclass of a torch.nn layer that keeps its ``forward`` (``class MyLinear(nn.Linear)``)."""
    for base in type(m).__mro__[1:]:
        if base.__module__.startswith("torch.nn.modules") and base not in _TORCH_CONTAINERS:
            return type(m).forward is base.forward
    return False


_PLAIN_NAMES = {operator.iadd: "add", operator.isub: "sub", operator.imul: "mul", operator.itruediv: "truediv"}
_TORCH_CONTAINERS = (nn.Module, nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)


class _InplaceProxy(fx.Proxy):
    """A Proxy that records ``a += b`` as ``operator.iadd``.

    fx's Proxy has no in-place operators, so Python rebinds ``a`` to ``a + b``
    and other names for the same tensor silently keep the old value; the
    rewrite pass ``remove_inplace`` then makes the mutation explicit. The node
    keeps the name of the plain operation (``add``), so qualified names read
    ``layer1.0.add``.
    """

    def _inplace(self, function: Callable, name: str, other: Any) -> fx.Proxy:
        return self.tracer.create_proxy("call_function", function, (self, other), {}, name=name)

    def __iadd__(self, other):
        return self._inplace(operator.iadd, "add", other)

    def __isub__(self, other):
        return self._inplace(operator.isub, "sub", other)

    def __imul__(self, other):
        return self._inplace(operator.imul, "mul", other)

    def __itruediv__(self, other):
        return self._inplace(operator.itruediv, "truediv", other)


def trace(
    model: nn.Module,
    concrete_args: Optional[Dict[str, Any]] = None,
    leaf_modules: Tuple[Type[nn.Module], ...] = (),
    leaf_functions: Tuple[Callable, ...] = (),
    record_inplace: bool = False,
) -> fx.GraphModule:
    """Trace ``model`` into a GraphModule whose nodes carry qualified names.

    Arguments are those of :class:`QualnameTracer`; ``concrete_args`` as for
    ``torch.fx.Tracer.trace``.

    The GraphModule shares the model's submodules and parameters. The model's
    ``training`` flags are the same afterwards, also when tracing fails.

    Raises:
        TracingError: the model cannot be traced; the error is also an instance
            of the exception type the tracer raised, and says which module
            failed, at which line of the user's source, and what to do.
    """
    tracer = QualnameTracer(leaf_modules, leaf_functions, record_inplace)
    with preserved_training_flags(model):
        try:
            graph = tracer.trace(model, concrete_args=concrete_args)
        except Exception as error:
            raise _tracing_error(error, tracer, model) from error
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


@contextlib.contextmanager
def preserved_training_flags(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit, whatever happened."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _innermost_user_frame() -> Optional[str]:
    """The calling frame outside torch and captum_graph, in fx's stack-trace format.

    Cheaper than fx's ``record_stack_traces``, which symbolises the whole stack
    for every node.
    """
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_DIRS):
        frame = frame.f_back
    if frame is None:
        return None
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    code = linecache.getline(filename, lineno).strip()
    return f'File "{filename}", line {lineno}, in {frame.f_code.co_name}\n    {code}'


def _tracing_error(error: Exception, tracer: QualnameTracer, model: nn.Module) -> Exception:
    where = tracer.module_path_stack[-1] if tracer.module_path_stack else ""
    module = model.get_submodule(where) if where else model
    owner = f"'{where}' ({type(module).__qualname__})" if where else f"the model ({type(model).__qualname__})"
    lines = [f"cannot trace {owner} with torch.fx: {error}"]
    frame = _user_frame(error)
    if frame is not None:
        lines.append(f"  at {frame}")
    lines.append(
        "To fix it: mark the module as a leaf (captum_graph.register_leaf_module(cls) "
        "or leaf_modules=...), wrap the function that cannot be traced "
        "(captum_graph.register_leaf_function(fn)), or fix data-dependent "
        "arguments with concrete_args={...}."
    )
    return tracing_error_class(type(error))("\n".join(lines))


def _user_frame(error: BaseException) -> Optional[str]:
    """The innermost traceback frame outside torch and captum_graph."""
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if not frame.filename.startswith(_INTERNAL_DIRS + ("<eval_with_key>",)) and "/contextlib.py" not in frame.filename:
            found = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}: {frame.line}"
    return found
