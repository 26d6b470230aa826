"""API pages generated from the ``__all__`` of every public module, and the docstring check.

A module is public if ``conf.py`` lists it in ``api_modules`` or if the README,
a tutorial or a page of the site imports from it (``from captum_graph.X import
...``, ``from captum_graph import X`` where ``X`` is a module). Each name of
its ``__all__`` gets a page, unless the same object already has one under an
earlier module (``captum_graph.register_rule`` and
``captum_graph.rules.register_rule``): the module's table then links there.
A public name, or a public method or property of a public class, without a
docstring (a ``#:`` comment for data) is reported as a warning, which fails
the ``-W`` build.
"""
import importlib
import inspect
import re
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set

from sphinx.application import Sphinx
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

from .files import write_if_changed

logger = logging.getLogger(__name__)

PACKAGE = "captum_graph"
_IMPORT = re.compile(r"(?:from[ \t]+(captum_graph(?:\.\w+)*)[ \t]+import[ \t]+(\([^)]*\)|[\w \t,]+)|import[ \t]+(captum_graph(?:\.\w+)*))")


@dataclass(frozen=True)
class PublicName:
    """One name of a public module's ``__all__`` and the page that documents its object."""

    module: str
    name: str
    obj: Any
    page_module: str  # the module under which the object has its page (itself, or an earlier one)

    @property
    def full_name(self) -> str:
        return f"{self.module}.{self.name}"

    @property
    def page_name(self) -> str:
        return f"{self.page_module}.{self.name}"

    @property
    def has_own_page(self) -> bool:
        return self.page_module == self.module


def imported_modules(texts: Iterable[str]) -> List[str]:
    """The ``captum_graph`` modules that ``texts`` import from, in order of first appearance."""
    found: List[str] = []
    for text in texts:
        for match in _IMPORT.finditer(text):
            module, names, plain = match.groups()
            candidates = [plain] if plain else [module] + [f"{module}.{n}" for n in re.findall(r"\w+", names)]
            for candidate in candidates:
                if _is_public_module(candidate) and candidate not in found:
                    found.append(candidate)
    return found


def _is_public_module(name: str) -> bool:
    if any(part.startswith("_") for part in name.split(".")):
        return False
    try:
        return isinstance(importlib.import_module(name), types.ModuleType)
    except ImportError:
        return False


def usage_texts(repo: Path) -> List[str]:
    """The README, the tutorials and the site's own pages: where users are shown imports."""
    paths = [repo / "README.md", *sorted((repo / "tutorials").glob("*.ipynb"))]
    paths += sorted(p for p in (repo / "docs" / "source").rglob("*.md") if "_generated" not in p.parts)
    return [p.read_text(encoding="utf-8") for p in paths if p.is_file()]


def public_modules(configured: Iterable[str], repo: Path) -> List[str]:
    """``configured`` followed by the other modules the usage texts import from."""
    modules = list(configured)
    modules += [m for m in imported_modules(usage_texts(repo)) if m not in modules]
    return modules


def public_names(modules: Iterable[str]) -> List[PublicName]:
    """Every ``__all__`` entry of ``modules``; an object documented twice keeps its first page."""
    names: List[PublicName] = []
    page_of: Dict[int, str] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            documentable = inspect.isclass(obj) or inspect.isroutine(obj)
            page_module = page_of.setdefault(id(obj), module_name) if documentable else module_name
            names.append(PublicName(module_name, name, obj, page_module))
    return names


def documented_objects(names: Iterable[PublicName]) -> Dict[int, str]:
    """``id(obj)`` to the full name its page documents it under, for classes and functions."""
    return {id(n.obj): n.page_name for n in names if n.has_own_page and (inspect.isclass(n.obj) or inspect.isroutine(n.obj))}


# ---------------------------------------------------------------------------
# docstrings
# ---------------------------------------------------------------------------
def data_doc(module_name: str, name: str) -> Optional[str]:
    """The ``#:`` comment of a module-level name, looked up where it is defined."""
    module = importlib.import_module(module_name)
    value = getattr(module, name)
    candidates = [module_name] + sorted(
        m for m, mod in list(importlib.sys.modules.items())
        if m.startswith(PACKAGE) and mod is not None and getattr(mod, name, _MISSING) is value
    )
    for candidate in candidates:
        docs = ModuleAnalyzer.for_module(candidate).find_attr_docs()
        if ("", name) in docs:
            return "\n".join(docs[("", name)]).strip() or None
    return None


_MISSING = object()


def summary(public: PublicName) -> str:
    """The first line of the object's documentation."""
    doc = _doc(public)
    return doc.strip().splitlines()[0] if doc else ""


def _doc(public: PublicName) -> Optional[str]:
    if inspect.isclass(public.obj) or inspect.isroutine(public.obj) or inspect.ismodule(public.obj):
        return inspect.getdoc(public.obj)
    return data_doc(public.module, public.name)


def _own_doc(value: Any) -> Optional[str]:
    target = value.fget if isinstance(value, property) else getattr(value, "__func__", value)
    doc = getattr(target, "__doc__", None)
    return doc if doc and doc.strip() else None


def _is_ours(cls: type) -> bool:
    return cls.__module__.startswith(PACKAGE)


def doc_origin(cls: type, name: str) -> Optional[type]:
    """The first class of ``cls``'s MRO that defines ``name`` with a docstring of its own."""
    return next((k for k in cls.__mro__ if name in vars(k) and _own_doc(vars(k)[name])), None)


def member_status(cls: type, name: str) -> str:
    """How a member of ``cls`` is documented.

    ``"ours"``: defined in captum_graph with a docstring of captum_graph's;
    ``"foreign"``: defined, or only documented, by torch or Captum (their
    documentation covers it: an undocumented ``forward`` override is such);
    ``"missing"``: defined in captum_graph and documented nowhere.
    """
    definer = next(k for k in cls.__mro__ if name in vars(k))
    if not _is_ours(definer):
        return "foreign"
    origin = doc_origin(cls, name)
    if origin is None:
        return "missing"
    return "ours" if _is_ours(origin) else "foreign"


def public_members(cls: type) -> List[str]:
    """Names of the public methods and properties of ``cls`` and its bases."""
    names = []
    for klass in cls.__mro__:
        for name, value in vars(klass).items():
            routine = isinstance(value, (types.FunctionType, property, classmethod, staticmethod))
            if routine and not name.startswith("_") and name not in names:
                names.append(name)
    return names


def missing_docstrings(names: Iterable[PublicName]) -> List[str]:
    """Full names of public objects and members without documentation."""
    missing = []
    for public in names:
        if not public.has_own_page:
            continue
        if not _doc(public):
            missing.append(public.full_name)
        if inspect.isclass(public.obj):
            missing += [f"{public.full_name}.{m}" for m in public_members(public.obj) if member_status(public.obj, m) == "missing"]
    return missing


# ---------------------------------------------------------------------------
# pages
# ---------------------------------------------------------------------------
def _object_page(public: PublicName) -> str:
    obj, name = public.obj, public.name
    lines = [name, "=" * len(name), "", f".. currentmodule:: {public.module}", ""]
    if inspect.isclass(obj):
        lines += [f".. autoclass:: {name}", "   :members:", "   :inherited-members:", "   :show-inheritance:"]
    elif inspect.isroutine(obj):
        lines += [f".. autofunction:: {name}"]
    else:
        lines += [f".. autodata:: {name}"]
        if not isinstance(obj, (str, int, float, bool, type(None))):
            lines += ["   :no-value:"]
    return "\n".join(lines) + "\n"


def _module_page(module_name: str, names: List[PublicName]) -> str:
    lines = [f"``{module_name}``", "=" * (len(module_name) + 4), "", f".. automodule:: {module_name}", "   :no-members:", ""]
    if names:
        lines += [".. list-table::", "   :widths: 30 70", ""]
        for public in names:
            lines += [f"   * - :py:obj:`{public.name} <{public.page_name}>`", f"     - {summary(public) or ' '}"]
        lines += ["", ".. toctree::", "   :hidden:", ""]
        lines += [f"   {public.page_name}" for public in names if public.has_own_page]
    return "\n".join(lines) + "\n"


def _index_page(modules: List[str]) -> str:
    lines = [".. toctree::", "   :maxdepth: 1", ""] + [f"   {m}" for m in modules]
    return "\n".join(lines) + "\n"


def write_pages(app: Sphinx, folder: Path) -> Set[Path]:
    """Write the module and object pages into ``folder``; warn about missing docstrings."""
    repo = Path(app.srcdir).parents[1]
    modules = public_modules(app.config.api_modules, repo)
    names = public_names(modules)
    app.env.captum_graph_documented = documented_objects(names)  # read by references.py
    for full_name in missing_docstrings(names):
        logger.warning(f"{full_name} is public but has no docstring", type="captum_graph", subtype="docstring")
    written = {write_if_changed(folder / "index.rst", _index_page(modules))}
    for module_name in modules:
        own = [n for n in names if n.module == module_name]
        written.add(write_if_changed(folder / f"{module_name}.rst", _module_page(module_name, own)))
        for public in own:
            if public.has_own_page:
                written.add(write_if_changed(folder / f"{public.page_name}.rst", _object_page(public)))
    return written
