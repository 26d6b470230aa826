"""Tables of the rule presets and of the default rules, read from ``captum_graph.rules``.

A preset or a default added to the package appears on the site by itself.
"""
import dataclasses
from pathlib import Path
from typing import Any, Set

from .files import write_if_changed

_PARAMETERS = (("STABILITY_FACTOR", "epsilon"), ("gamma", "gamma"), ("low", "low"), ("high", "high"), ("alpha", "alpha"), ("beta", "beta"))


def _reference(cls: type) -> str:
    return f"{{py:class}}`~{cls.__module__}.{cls.__qualname__}`"


def describe_rule(rule: Any) -> str:
    """A rule instance as MyST: its class, referenced, and the parameters that matter."""
    if rule is None:
        return "the default rule"
    parameters = []
    for attribute, shown in _PARAMETERS:
        value = vars(rule).get(attribute)  # set by the constructor, not a class default
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parameters.append(f"{shown}={value:g}")
    return f"{_reference(type(rule))} `({', '.join(parameters)})`" if parameters else _reference(type(rule))


def _type_name(cls: type) -> str:
    """``nn.Conv2d``, ``modules.Softmax`` (captum_graph's), ``Addition_Module`` (Captum's)."""
    if cls.__module__.startswith("torch.nn"):
        return f"nn.{cls.__qualname__}"
    if cls.__module__.startswith("captum_graph."):
        return f"{cls.__module__.split('.', 1)[1]}.{cls.__qualname__}"
    return cls.__qualname__


def _instance(factory: Any) -> Any:
    return factory() if callable(factory) else factory


def presets_table() -> str:
    """One row per preset, one column per kind of layer it sets."""
    from captum_graph.rules import PRESETS

    presets = list(PRESETS.values())
    fields = [f.name for f in dataclasses.fields(presets[0]) if f.name != "name"]
    lines = ["| preset | " + " | ".join(f.replace("_", " ") for f in fields) + " |", "|---" * (len(fields) + 1) + "|"]
    for preset in presets:
        cells = [describe_rule(_instance(getattr(preset, f))) for f in fields]
        lines.append(f"| `{preset.name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def defaults_table() -> str:
    """The built-in default rules, in the order they are matched (first ``isinstance`` match wins)."""
    # reason: the defaults live in a private table of captum_graph.rules (fragile coupling:
    # if it moves, this raises and the build fails)
    from captum_graph.rules import _DEFAULT_RULES

    lines = ["| module types | default rule |", "|---|---|"]
    for types, factory in _DEFAULT_RULES:
        names = ", ".join(f"`{_type_name(t)}`" for t in types)
        lines.append(f"| {names} | {describe_rule(_instance(factory))} |")
    return "\n".join(lines) + "\n"


def write_tables(folder: Path) -> Set[Path]:
    return {
        write_if_changed(folder / "presets.md", presets_table()),
        write_if_changed(folder / "default_rules.md", defaults_table()),
    }
