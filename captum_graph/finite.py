"""Non-finite values: refused in the inputs, and located where relevance first becomes non-finite.

A NaN or an infinity spreads through every sum that reads it, so one in the
input, or one made by an overflow in float16, silently spoils the relevance of
everything it reaches. Checking the inputs and the results costs one pass over
each; only when a result is not finite is the graph run again
(:func:`locate_non_finite`) to name the node where it first appears.
"""
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch import Tensor

from .engine import LayerCapture, relevance_hooks
from .errors import NonFiniteError, describe_node
from .rules import RuleAssignment

__all__ = ["is_finite", "check_finite_inputs", "locate_non_finite", "count_non_finite"]


def is_finite(tensors: Sequence[Optional[Tensor]]) -> bool:
    """Whether every floating-point tensor among ``tensors`` holds finite values only."""
    return all(
        bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, Tensor) and (t.is_floating_point() or t.is_complex())
    )


def count_non_finite(tensor: Tensor) -> str:
    """``"3 of 1536 values are not finite (2 NaN, 1 +inf)"``."""
    nan = int(torch.isnan(tensor).sum())
    positive = int(torch.isposinf(tensor).sum())
    negative = int(torch.isneginf(tensor).sum())
    kinds = [f"{n} {kind}" for n, kind in ((nan, "NaN"), (positive, "+inf"), (negative, "-inf")) if n]
    return f"{nan + positive + negative} of {tensor.numel()} values are not finite ({', '.join(kinds)})"


def check_finite_inputs(inputs: Sequence[Any]) -> None:
    """Raise for an input tensor holding NaN or infinite values.

    Only the attributed ``inputs`` are checked: ``additional_forward_args``
    may hold infinities on purpose (an additive attention mask of ``-inf``).

    Raises:
        NonFiniteError: names the input (its position and shape) and counts its non-finite values.
    """
    for position, value in enumerate(inputs):
        if isinstance(value, Tensor) and not is_finite([value]):
            raise NonFiniteError(
                f"input {position} (shape {tuple(value.shape)}, {value.dtype}): {count_non_finite(value)}. "
                "Relevance and gradients of a NaN or an infinity are NaN wherever they reach; "
                "replace them in the input (e.g. torch.nan_to_num) before explaining it."
            )


def locate_non_finite(
    gm: fx.GraphModule,
    assignments: Sequence[RuleAssignment],
    run: Callable[[Callable[..., Any]], Tensor],
    inputs: Sequence[Tensor],
    captures: Sequence[LayerCapture] = (),
) -> str:
    """Where the forward values or the relevance of ``gm`` first become non-finite, as a message.

    Runs ``gm`` again under the rules of ``assignments``, through an
    interpreter that watches every node: in the forward pass, the first node
    whose value is not finite; in the backward pass, the first node (in the
    order the backward pass reaches them) whose output receives non-finite
    relevance, and the readers whose rules produced it. The first run takes
    every rule's step on its own (no fused ratios, see ``fusion.py``), so the
    culprit is the layer whose rule it is; if that run stays finite, a second
    one takes the call's own plan (with its ``captures``).
    ``run(forward)`` calls ``forward`` on the call's inputs and returns the
    target outputs.
    """
    rule_names = {a.qualname: a.rule_name for a in assignments}
    unfused = [_Unfused(str(node.target)) for node in gm.graph.find_nodes(op="call_module")]
    for plan in (unfused, captures):
        watcher = _Watcher(gm)
        with relevance_hooks(gm, assignments, plan) as sources, torch.enable_grad():
            outputs = run(watcher.run)
            if watcher.forward is None and outputs.requires_grad:
                leaves = [x for x in inputs if x.requires_grad] + sources
                torch.autograd.grad(outputs, leaves, outputs.detach(), allow_unused=True)
        if watcher.forward is not None or watcher.backward:
            return watcher.describe(rule_names, fused=plan is captures)
    return "a diagnostic pass did not reproduce them (is the model's forward random?)"


class _Unfused(LayerCapture):
    """A capture that keeps nothing: a node with one is left out of the fused ratios."""

    def __init__(self, node_target: str) -> None:
        super().__init__(node_target, at_input=False)

    def store(self, index: int) -> Callable[[Tensor], None]:
        return lambda grad: None


_FUSED_HINT = (
    "\n  Only with fused ratios: this step also takes the ratio of the epsilon layer before it "
    "(a ReLU's output may be 0, and an epsilon of 0 then divides 0 by 0)."
)


def _dtype_hint(dtype: torch.dtype, what: str) -> str:
    if dtype not in (torch.float16, torch.bfloat16):
        return ""
    info = torch.finfo(dtype)
    return (
        f"\n  In {dtype} (largest {info.max:.5g}, smallest normal {info.tiny:.3g}) {what}: "
        "explain the model in float32 (model.float() and float32 inputs)."
    )


class _Watcher(fx.Interpreter):
    """Runs a graph recording the first non-finite forward value and every non-finite gradient."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.forward: Optional[tuple] = None  # (node, value)
        self.backward: List[tuple] = []  # (node, gradient) in the order the backward pass reaches them
        self.finite_grad: Dict[fx.Node, bool] = {}

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        tensor = value[0] if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor) else value
        if isinstance(tensor, Tensor) and (tensor.is_floating_point() or tensor.is_complex()):
            if self.forward is None and not is_finite([tensor]):
                self.forward = (node, tensor.detach())
            if tensor.requires_grad:
                tensor.register_hook(self._recorder(node))
        return value

    def _recorder(self, node: fx.Node) -> Callable[[Tensor], None]:
        def record(grad: Tensor) -> None:
            finite = is_finite([grad])
            self.finite_grad[node] = self.finite_grad.get(node, True) and finite
            if not finite:
                self.backward.append((node, grad.detach()))

        return record

    def describe(self, rule_names: Mapping[str, str], fused: bool) -> str:
        """What was found, for the error message; ``fused``: found only with the call's fused ratios."""
        if self.forward is not None:
            node, value = self.forward
            what = "holds" if node.op == "get_attr" else "computes"
            return (
                f"the forward pass {what} non-finite values at {describe_node(node)}\n  {count_non_finite(value)}"
                f"{_dtype_hint(value.dtype, 'values above the largest number overflow')}"
            )
        node, grad = self.backward[0]
        readers = [user for user in node.users if user.op == "call_module" and self.finite_grad.get(user, True)]
        if not readers:
            return f"relevance first becomes non-finite at the output of {describe_node(node)}\n  {count_non_finite(grad)}"
        steps = "\n".join(
            f"{describe_node(reader)}\n  rule {rule_names.get(reader.meta.get('qualname', reader.name), '-')}"
            for reader in readers
        )
        return (
            f"relevance first becomes non-finite in the backward step of {steps}\n"
            f"  (finite at its output; at its input from node '{node.meta.get('qualname', node.name)}' "
            f"{count_non_finite(grad)})"
            f"{_FUSED_HINT if fused else ''}"
            f"{_dtype_hint(grad.dtype, 'a stabiliser (epsilon) or a ratio may underflow or overflow')}"
        )
