"""Exceptions and the node description every error message is built from."""
import functools
import os
from typing import Optional, Type

import torch.fx as fx


class CaptumGraphError(Exception):
    """Base class of every error captum_graph raises."""


class TracingError(CaptumGraphError):
    """The model could not be traced with torch.fx.

    Raised as a subclass of both this class and the exception the tracer raised,
    so ``except TypeError`` written for the original error keeps working.
    """


class UnsupportedOperationError(CaptumGraphError, TypeError):
    """An operation of the model has no known relevance rule.

    Subclasses ``TypeError`` because Captum's LRP raises ``TypeError`` for a
    module without a rule.
    """


class LayerResolutionError(CaptumGraphError, ValueError):
    """A layer given by name or module could not be resolved to one graph node."""


@functools.lru_cache(maxsize=None)
def tracing_error_class(original: Type[BaseException]) -> Type[TracingError]:
    """A ``TracingError`` subclass that is also an instance of ``original``."""
    if issubclass(original, TracingError) or not issubclass(original, Exception):
        return TracingError
    try:
        return type("TracingError", (TracingError, original), {})
    except TypeError:  # layouts that cannot be combined, e.g. some C extensions
        return TracingError


def source_line(node: fx.Node) -> Optional[str]:
    """The user's ``file:line: code`` a node came from, if fx recorded it."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    # fx writes frames as 'File "path", line N, in fn' followed by the code line;
    # the last frame is the innermost, i.e. where the operation was written.
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("File "):
            parts = lines[i].split('"')
            path = parts[1] if len(parts) > 1 else "?"
            lineno = lines[i].split("line ")[-1].split(",")[0]
            code = lines[i + 1] if i + 1 < len(lines) else ""
            return f"{os.path.basename(path)}:{lineno}: {code}"
    return None


def describe_node(node: fx.Node) -> str:
    """Name, operation, owning module and source line of a node, for messages."""
    target = node.target
    target_name = getattr(target, "__name__", None) or str(target)
    if node.op == "call_function":
        module_name = getattr(target, "__module__", None) or ""
        if module_name in ("_operator", "operator"):
            module_name = "operator"
        target_name = f"{module_name}.{target_name}" if module_name else target_name
    qualname = node.meta.get("qualname", node.name)
    text = f"node '{qualname}' ({node.op} {target_name})"
    stack = node.meta.get("nn_module_stack")
    if stack:
        owner_path, owner_type = list(stack.values())[-1]
        owner_type = getattr(owner_type, "__qualname__", str(owner_type))
        text += f"\n  in module '{owner_path}' ({owner_type})"
    where = source_line(node)
    if where:
        text += f", at {where}"
    return text
