"""What a reference may point at, and which inherited members a class page shows.

With ``nitpicky`` every Python reference must resolve. One that Sphinx cannot
resolve is accepted here if it names an importable object: an object that has
a page under another name (``captum_graph.architecture.ModelArchitecture``)
links to that page, any other (``torch.Tensor``, ``captum.attr.LRP``, an
internal helper) is shown as code. A name that imports nothing (a typo, a
renamed function) stays unresolved and fails the ``-W`` build.
"""
import builtins
import collections
import importlib
import sys
from typing import Any, Iterable, List, Optional

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

from . import api

PACKAGE = "captum_graph"
_NOT_FOUND = object()


def import_object(path: str) -> Any:
    """The object ``path`` names (``package.module.Class.attribute``), or ``_NOT_FOUND``."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except Exception:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute, _NOT_FOUND)
            if obj is _NOT_FOUND:
                break
        else:
            return obj
    return getattr(builtins, path, _NOT_FOUND) if "." not in path else _NOT_FOUND


def _candidates(target: str, module: Optional[str], cls: Optional[str]) -> Iterable[str]:
    """Where ``target`` may live, seen from a page of ``module`` (and ``cls``): innermost first."""
    prefixes: List[str] = []
    if module:
        parts = module.split(".")
        if cls:
            prefixes.append(f"{module}.{cls}")
        prefixes += [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    yield from (f"{prefix}.{target}" for prefix in prefixes)
    yield target
    # a docstring's unqualified name may live in the module that defines the documented object
    yield from sorted(f"{name}.{target}" for name in list(sys.modules) if name.startswith(PACKAGE + "."))


def _defined_in(obj: Any) -> Optional[str]:
    """The module that defines a function, method, property or C method (``tuple.count``)."""
    owner = getattr(obj, "__objclass__", None)
    if owner is not None:
        return owner.__module__
    return getattr(obj, "__module__", None) or getattr(getattr(obj, "fget", None), "__module__", None)


_TUPLE_FIELD = type(collections.namedtuple("_Probe", "field").field)


def resolve_missing(app: Sphinx, env: BuildEnvironment, node: nodes.Element, contnode: nodes.Element):
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"].lstrip(".~")
    documented = getattr(env, "captum_graph_documented", {})
    for candidate in _candidates(target, node.get("py:module"), node.get("py:class")):
        obj = import_object(candidate)
        if obj is _NOT_FOUND:
            continue
        page_name = documented.get(id(obj))
        if page_name and page_name != candidate:
            domain = env.get_domain("py")
            found = domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], page_name, node, contnode)
            if found is not None:
                return found
        return contnode
    return None


def _owner_class(obj: Any) -> Optional[type]:
    """The class a method or property was defined in, from its qualified name."""
    function = getattr(obj, "fget", None) or getattr(obj, "__func__", obj)
    qualname, module = getattr(function, "__qualname__", ""), getattr(function, "__module__", None)
    if "<locals>" in qualname or "." not in qualname or module is None:
        return None
    owner: Any = sys.modules.get(module)
    for part in qualname.split(".")[:-1]:
        owner = getattr(owner, part, None)
    return owner if isinstance(owner, type) else None


def skip_foreign_members(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any) -> Optional[bool]:
    """Hide members that torch or Captum define or document: their pages cover them."""
    if what != "class" or skip:
        return None
    if isinstance(obj, _TUPLE_FIELD):  # "Alias for field number 0": the class's Attributes section says more
        return True
    module = _defined_in(getattr(obj, "__func__", obj))
    if module is None:  # data attributes: keep what autodoc keeps
        return None
    if not module.startswith(PACKAGE):
        return True
    owner = _owner_class(obj)
    return True if owner is not None and api.member_status(owner, name) == "foreign" else None


def drop_private_bases(app: Sphinx, name: str, obj: Any, options: Any, bases: list) -> None:
    """``Bases:`` shows public classes only (not ``_GraphLRPMixin``, nor ``object``)."""
    bases[:] = [base for base in bases if base is not object and not base.__name__.startswith("_")]


def setup(app: Sphinx) -> None:
    app.connect("missing-reference", resolve_missing)
    app.connect("autodoc-skip-member", skip_foreign_members)
    app.connect("autodoc-process-bases", drop_private_bases)
