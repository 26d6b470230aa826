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


def _kind(kind: Any) -> str:
    """A layer kind: a name (``"addition"``) or a tuple of module types."""
    if isinstance(kind, tuple):
        return ", ".join(f"`{_type_name(t)}`" for t in kind)
    return f"`{kind}`"


def _is_rule(value: Any) -> bool:
    """A rule instance, a rule class or a factory (a function returning a rule)."""
    from captum.attr._utils.lrp_rules import PropagationRule

    return isinstance(value, PropagationRule) or callable(value)


def cell(value: Any) -> str:
    """One field of a preset as MyST: a rule, ``(kind, rule)`` pairs, or a plain value."""
    if value is None:
        return "the default rule"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        if not value:
            return "-"
        if all(isinstance(v, tuple) and len(v) == 2 and _is_rule(v[1]) for v in value):
            return "; ".join(f"{_kind(kind)}: {describe_rule(_instance(rule))}" for kind, rule in value)
        return ", ".join(f"`{v}`" for v in value)
    if _is_rule(value):
        return describe_rule(_instance(value))
    return f"`{value!r}`"


def presets_table() -> str:
    """One row per preset, one column per field of ``Preset``: new presets and fields appear by themselves."""
    from captum_graph.rules import PRESETS

    presets = list(PRESETS.values())
    fields = [f.name for f in dataclasses.fields(presets[0]) if f.name != "name"]
    lines = ["| preset | " + " | ".join(f.replace("_", " ") for f in fields) + " |", "|---" * (len(fields) + 1) + "|"]
    for preset in presets:
        lines.append(f"| `{preset.name}` | " + " | ".join(cell(getattr(preset, f)) for f in fields) + " |")
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


def rule_classes() -> list:
    """The rule classes ``captum_graph.rules`` exports."""
    import captum_graph.rules
    from captum.attr._utils.lrp_rules import PropagationRule

    public = (getattr(captum_graph.rules, name) for name in captum_graph.rules.__all__)
    return [obj for obj in public if isinstance(obj, type) and issubclass(obj, PropagationRule)]


def other_rules_table(page: str) -> str:
    """Rules exported but missing from ``page``'s hand-written table, with their docstrings' first paragraph."""
    missing = [rule for rule in rule_classes() if f"captum_graph.rules.{rule.__name__}`" not in page]
    if not missing:
        return ""
    lines = ["More rules, from their docstrings:", "", "| rule | what it does |", "|---|---|"]
    for rule in missing:
        paragraph = " ".join((rule.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"| {_reference(rule)} | {paragraph.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def write_tables(folder: Path, rules_page: Path) -> Set[Path]:
    return {
        write_if_changed(folder / "presets.md", presets_table()),
        write_if_changed(folder / "default_rules.md", defaults_table()),
        write_if_changed(folder / "other_rules.md", other_rules_table(rules_page.read_text(encoding="utf-8"))),
    }
