"""Exceptions and the node description every error message is built from."""
import functools
import os
import traceback
from typing import Optional, Type

import torch
import torch.fx as fx


class CaptumGraphError(Exception):
    """Base class of every error captum_graph raises."""


class TracingError(CaptumGraphError):
    """The model's graph could not be captured.

    Raised as a subclass of both this class and the exception the capture
    raised, so ``except TypeError`` written for the original error keeps working.
    """


class CaptureError(TracingError):
    """``torch.export`` could not capture the model at the call's inputs."""


class UnsupportedOperationError(CaptumGraphError, TypeError):
    """An operation of the model has no known relevance rule.

    Subclasses ``TypeError`` because Captum's LRP raises ``TypeError`` for a
    module without a rule.
    """


class LayerResolutionError(CaptumGraphError, ValueError):
    """A layer given by name or module could not be resolved to one graph node."""


class NonFiniteError(CaptumGraphError, ValueError):
    """An input, or the relevance computed from finite inputs, holds NaN or infinite values."""


@functools.lru_cache(maxsize=None)
def error_class(base: Type[CaptumGraphError], original: Type[BaseException]) -> Type[CaptumGraphError]:
    """A subclass of ``base`` that is also an instance of ``original``."""
    if issubclass(original, CaptumGraphError) or not issubclass(original, Exception):
        return base
    try:
        return type(base.__name__, (base, original), {"__str__": Exception.__str__})  # KeyError quotes its text
    except TypeError:  # layouts that cannot be combined, e.g. some C extensions
        return base


_INTERNAL_DIRS = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _is_internal(filename: str) -> bool:
    return filename.startswith(_INTERNAL_DIRS) or filename.startswith("<") or "/contextlib.py" in filename


def user_frame(error: BaseException) -> Optional[str]:
    """The innermost traceback frame outside torch and captum_graph, as ``file:line: code``."""
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if not _is_internal(frame.filename):
            found = f"{os.path.basename(frame.filename)}:{frame.lineno}: {frame.line}"
    return found


def source_line(node: fx.Node) -> Optional[str]:
    """The user's ``file:line: code`` a node came from, if fx recorded it."""
    trace = node.stack_trace or node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    # Frames read 'File "path", line N, in fn' followed by the code line; the
    # innermost frame outside torch and captum_graph is where the user wrote it.
    innermost = user = None
    for i, line in enumerate(lines):
        if line.startswith("File "):
            parts = line.split('"')
            path = parts[1] if len(parts) > 1 else "?"
            lineno = line.split("line ")[-1].split(",")[0]
            code = lines[i + 1] if i + 1 < len(lines) else ""
            innermost = f"{os.path.basename(path)}:{lineno}: {code}"
            user = user if _is_internal(path) else innermost
    return user or innermost


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
