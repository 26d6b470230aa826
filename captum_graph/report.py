"""A non-raising report of what captum_graph does with a model."""
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence

from captum._utils.typing import TargetType
from captum.attr._utils.custom_modules import Addition_Module
from torch import Tensor, nn

from .errors import CaptumGraphError
from .prepare import prepare
from .rules import UniformSplitRule, assign_rules, preset_folds_batch_norm

__all__ = ["model_report", "format_report", "branch_relevance"]


def model_report(model: nn.Module, preset: Optional[str] = None, inputs: Optional[Sequence[Any]] = None) -> Dict[str, Any]:
    """Graph summary, rewritten operations, rule per node, Grad-CAM layer, problems.

    The graph is captured at ``inputs`` (the call's positional arguments; by
    default an example image). Never raises for an unsupported operation: such
    nodes are listed under ``"unsupported"`` with the reason and source line.
    """
    prepared = prepare(model, inputs, preset_folds_batch_norm(preset))  # as LRP(model, preset=preset) does
    gm = prepared.graph_module
    assignments = assign_rules(gm, preset=preset, origins=prepared.origins)
    architecture = prepared.architecture()
    try:
        cam = architecture.find_cam_target_node()
    except CaptumGraphError:
        cam = None
    return {
        "model": type(model).__name__,
        "nodes": dict(Counter(node.op for node in gm.graph.nodes)),
        "rewritten": [
            {"node": a.qualname, "was": a.replaced, "module": a.module_type} for a in assignments if a.replaced
        ],
        "rules": [
            {"node": a.qualname, "module": a.module_type or "function", "rule": a.rule_name, "source": a.source}
            for a in assignments
            if not a.problem
        ],
        "gradcam_layer": cam.qualname if cam is not None else None,
        "unsupported": [{"node": a.qualname, "problem": a.problem} for a in assignments if a.problem],
        "warnings": [
            f"{a.qualname}: a product of two input-dependent tensors with no known role; "
            "relevance is split in half between them (UniformSplitRule)"
            for a in assignments
            if isinstance(a.rule, UniformSplitRule) and a.source == "default"  # a preset's split is chosen
        ],
    }


def branch_relevance(model: nn.Module, inputs: Tensor, target: TargetType = None, **lrp_kwargs: Any) -> List[Dict[str, Any]]:
    """For every addition in the model, how much relevance each of its inputs carries.

    One LRP pass; per addition node a row with the relevance of the output and
    of each input summed per example (for a residual block: the branch and the
    skip connection), and the skip's share. ``lrp_kwargs`` go to
    :class:`captum_graph.attr.LayerLRP` (``rules``, ``preset``).
    """
    from .attr import LayerLRP

    gm = prepare(model, (inputs,)).graph_module
    additions = [n.meta["qualname"] for n in gm.graph.find_nodes(op="call_module") if isinstance(gm.get_submodule(n.target), Addition_Module)]
    if not additions:
        return []
    per_input = LayerLRP(model, additions, **lrp_kwargs).attribute(inputs, target=target, attribute_to_layer_input=True)
    rows = []
    for name, relevances in zip(additions, per_input):
        sums = [r.flatten(1).sum(1) for r in (relevances if isinstance(relevances, tuple) else (relevances,))]
        total = sum(sums)
        rows.append({"node": name, "inputs": [s.tolist() for s in sums], "share_of_last_input": (sums[-1] / total).tolist()})
    return rows


def format_report(report: Dict[str, Any], max_rules: Optional[int] = None) -> str:
    """The report as aligned text for a terminal."""
    lines: List[str] = [f"Model: {report['model']}"]
    lines.append("Graph: " + ", ".join(f"{count} {op}" for op, count in report["nodes"].items()))
    lines.append(f"\nFunctional operations rewritten into modules: {len(report['rewritten'])}")
    lines += [f"  {r['node']:<40} {r['was']:<32} -> {r['module']}" for r in report["rewritten"]]
    rules = report["rules"] if max_rules is None else report["rules"][:max_rules]
    lines.append(f"\nLRP rule per node ({len(report['rules'])} nodes):")
    lines += [f"  {r['node']:<40} {r['module']:<24} {r['rule']:<22} {r['source']}" for r in rules]
    if max_rules is not None and len(report["rules"]) > max_rules:
        lines.append(f"  ... {len(report['rules']) - max_rules} more (use --all)")
    lines.append(f"\nAutomatic Grad-CAM layer: {report['gradcam_layer']}")
    for warning in report.get("warnings", []):
        lines.append(f"Warning: {warning}")
    if report["unsupported"]:
        lines.append(f"\nUnsupported operations: {len(report['unsupported'])}")
        lines += ["  " + r["problem"].replace("\n", "\n  ") for r in report["unsupported"]]
    else:
        lines.append("Unsupported operations: none")
    return "\n".join(lines)
