"""LRP as one forward and one backward pass over a prepared graph.

Relevance travels backwards as the gradient. Each module with a rule gets two
light autograd functions on the graph's private copy of the module: one on its
output that turns incoming relevance into a ratio (``R / z``), one on each
input that turns the backpropagated ratio into relevance (``x * grad``). With
the epsilon rule this is exact epsilon-LRP at the cost of a plain backward.
Between epsilon layers the two meet in one step, computed in place (see
``fusion.py``): there the backward pass costs about what a plain one does.
Other rules compute input relevance from output relevance in the backward
pass. Nothing is registered on the user's modules.
"""
import contextlib
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from captum.attr._utils.lrp_rules import IdentityRule, PropagationRule
from torch import Tensor, nn

from .cloning import private_copy
from .fusion import FusedRatios, RatioAtOutput, RatioOfRecomputedSum, fused_forward, fused_ratios, is_plain_epsilon
from .linearized import linearized_forward
from .modules import Function, Lookup
from .rules import (
    ConstantRule,
    ExplicitRule,
    MoveRule,
    PassThroughRule,
    RuleAssignment,
    constant_inputs,
    init_rule_state,
    stabilize,
)

__all__ = ["relevance_hooks", "LayerCapture"]


class _MultiplyByInput(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by the value (ratio -> relevance)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * x


def _foldable(module: nn.Module, args: tuple) -> tuple:
    """The arguments of a functional linear layer with its batched input made contiguous.

    ``aten.linear`` folds a contiguous ``(..., features)`` input into one
    matrix product; a transposed one (multi-head attention's sequence-first
    view) becomes a batched product with the weight repeated per row group,
    twice as slow on CPUs. The copy costs one pass over the input.
    """
    if not isinstance(module, Function) or getattr(module.fn, "overloadpacket", None) is not torch.ops.aten.linear:
        return args
    x = args[0] if args else None
    if not isinstance(x, Tensor) or x.dim() <= 2 or x.is_contiguous():
        return args
    return (x.contiguous(),) + args[1:]


class _DivideByOutput(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the stabilised value."""

    @staticmethod
    def forward(ctx, z: Tensor, epsilon: float) -> Tensor:
        ctx.save_for_backward(z)
        ctx.epsilon = epsilon
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        (z,) = ctx.saved_tensors
        denominator = stabilize(z, ctx.epsilon)  # a fresh tensor: the quotient can overwrite it
        if grad.requires_grad:  # a double backward records the division
            return grad / denominator, None
        return torch.div(grad, denominator, out=denominator), None


class _PassThrough(torch.autograd.Function):
    """Returns ``y``; backward hands the gradient of ``y`` to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:
        ctx.x_shape = x.shape
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None]:
        return grad.reshape(ctx.x_shape) if grad.shape != ctx.x_shape else grad, None


class _RuleFunction(torch.autograd.Function):
    """Returns ``output``; backward asks ``propagate`` for the inputs' relevance."""

    @staticmethod
    def forward(ctx, propagate: Callable, output: Tensor, *inputs: Tensor) -> Tensor:
        ctx.propagate = propagate
        ctx.save_for_backward(*inputs)
        return output.detach().view_as(output)

    @staticmethod
    def backward(ctx, grad: Tensor):
        relevances = ctx.propagate(ctx.saved_tensors, grad)
        return (None, None) + tuple(relevances)


class _Capture(torch.autograd.Function):
    """Identity; stores the gradient passing through (relevance at a layer)."""

    @staticmethod
    def forward(ctx, x: Tensor, store: Callable[[Tensor], None]) -> Tensor:
        ctx.store = store
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        ctx.store(grad)
        return grad, None


def _tensors(values: Sequence) -> List[int]:
    return [i for i, v in enumerate(values) if isinstance(v, Tensor) and v.requires_grad]


class LayerCapture:
    """Collects relevance at one module's output or inputs during the backward pass.

    ``output_like``: the captured output's shape, dtype and device, seen in
    the forward pass: an output that no relevance reaches (it only feeds
    what LRP holds constant, such as a gate) has zero relevance.
    """

    def __init__(self, node_target: str, at_input: bool) -> None:
        self.node_target = node_target
        self.at_input = at_input
        self.relevance: Dict[int, Tensor] = {}
        self.output_like: Optional[Tuple[torch.Size, torch.dtype, torch.device]] = None

    def store(self, index: int) -> Callable[[Tensor], None]:
        def _store(grad: Tensor) -> None:
            self.relevance[index] = grad if index not in self.relevance else self.relevance[index] + grad

        return _store


def _epsilon_hooks(
    rule: PropagationRule,
    output: str = "divide",
    ratio_args: FrozenSet[int] = frozenset(),
    reuse: bool = False,
    ratio_inputs: Optional[Dict[int, Tuple[float, bool]]] = None,
):
    """Multiply by each input (but those at ``ratio_args``) and treat the output.

    ``output``: ``"divide"`` by its stabilised value, ``"ratio"`` (its readers
    leave out their multiplication, :class:`RatioAtOutput`, which may
    ``reuse`` the output's memory), ``"recompute"`` (the same, an addition's
    sum recomputed from its terms, :class:`RatioOfRecomputedSum`) or
    ``"none"`` (a ReLU after it takes the ratio, :class:`_ReluWithRatio`, or
    its readers take it on a copy).
    ``ratio_inputs``: the positions where this layer takes the ratio of the
    layer that produced the argument, ``{position: (epsilon, reuse)}``.
    """
    epsilon = rule.STABILITY_FACTOR
    ratio_inputs = ratio_inputs or {}

    def pre(module, args):
        constant = constant_inputs(module, rule)  # no relevance enters these
        skipped = ratio_args | frozenset(range(len(args)) if constant == "all" else constant)
        args = tuple(_input_step(i, a, skipped) for i, a in enumerate(args))
        return _foldable(module, args)

    def _input_step(i: int, a, skipped: FrozenSet[int]):
        if not isinstance(a, Tensor) or not a.requires_grad:
            return a
        if i in ratio_inputs:
            return RatioAtOutput.apply(a, *ratio_inputs[i])
        return a if i in skipped else _MultiplyByInput.apply(a)

    def post(module, args, out):
        if isinstance(out, tuple):  # e.g. attention's (output, weights)
            return (post(module, args, out[0]),) + out[1:]
        if not out.requires_grad:
            return out
        if output == "recompute":
            return RatioOfRecomputedSum.apply(out, epsilon, module.forward, *args)
        return _DivideByOutput.apply(out, epsilon) if output == "divide" else RatioAtOutput.apply(out, epsilon, reuse)

    return pre, None if output == "none" else post


def _pass_hooks():
    """Hand relevance to the input unchanged."""

    def post(module, args, output):
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is None or not first.requires_grad or not isinstance(output, Tensor):
            return output
        if first.numel() != output.numel():
            raise ValueError(
                f"a pass-through rule (IdentityRule, PassThroughRule) needs an output as large as the "
                f"input, but {type(module).__name__} maps {tuple(first.shape)} to {tuple(output.shape)}; "
                "choose another rule for it"
            )
        return _PassThrough.apply(first, output)

    return None, post


def _explicit_hooks(rule: PropagationRule):
    bare: Dict[int, nn.Module] = {}  # hook-free copy: calling the hooked module would recurse

    def post(module, args, output):
        indices = _tensors(args)
        if not indices or not isinstance(output, Tensor):
            return output
        inputs = tuple(args[i] for i in indices)

        def propagate(saved: Tuple[Tensor, ...], relevance: Tensor):
            full = list(args)
            for i, value in zip(indices, saved):
                full[i] = value
            if id(module) not in bare:
                bare[id(module)] = private_copy(module)
            return _propagate(rule, bare[id(module)], tuple(full), indices, relevance)

        return _RuleFunction.apply(propagate, output, *inputs)

    return None, post


def _propagate(rule: PropagationRule, module: nn.Module, args: tuple, indices: List[int], relevance: Tensor):
    """Input relevance from output relevance, for rules without a fast path."""
    if isinstance(rule, ExplicitRule):
        leaves = tuple(a.detach().requires_grad_(i in indices) if isinstance(a, Tensor) else a for i, a in enumerate(args))
        result = rule.relevance(module, leaves, relevance)
        return [result[i] if i < len(result) else None for i in indices]
    # A Captum rule: replay its weight change on a throwaway copy and its hooks. Its stabiliser
    # (1e-9) vanishes in 16-bit floats and its sums of positive parts lose their digits: float32.
    dtype = relevance.dtype
    target = private_copy(module)
    if dtype in (torch.float16, torch.bfloat16):
        target.float()  # the copy's own parameter objects and buffer dict: the originals stay
        args = tuple(a.float() if isinstance(a, Tensor) and a.dtype == dtype else a for a in args)
        relevance = relevance.float()
    rule._manipulate_weights(target, args, None)
    detached = [a.detach().requires_grad_() if i in indices else a for i, a in enumerate(args)]
    inputs = [detached[i] for i in indices]
    init_rule_state(rule)
    rule._has_single_input = len(inputs) == 1
    with torch.enable_grad():
        z = target(*detached)
        ratio = rule._create_backward_hook_output(z.detach())(relevance)
        grads = torch.autograd.grad(z, inputs, ratio, allow_unused=True)
    return [
        None if g is None else rule._create_backward_hook_input(x.detach())(g).to(dtype) for x, g in zip(inputs, grads)
    ]


def _constant_hooks():
    def post(module, args, output):
        return output.detach()

    return None, post


def _hooks_for(target: str, rule: PropagationRule, fused: FusedRatios):
    if isinstance(rule, MoveRule):
        return None, None
    if isinstance(rule, ConstantRule):
        return _constant_hooks()
    if isinstance(rule, (PassThroughRule, IdentityRule)):
        return (None, None) if _takes_a_ratio(target, fused) else _pass_hooks()
    if is_plain_epsilon(rule):
        ratio_args = frozenset(fused.ratio_args.get(target, ()))
        ratio_inputs = fused.at_inputs.get(target)
        if target in fused.at_output:
            return _epsilon_hooks(rule, "ratio", ratio_args, fused.at_output[target][1], ratio_inputs)
        if target in fused.recomputed_sums:
            return _epsilon_hooks(rule, "recompute", ratio_args, ratio_inputs=ratio_inputs)
        silent = target in fused.before_relu or target in fused.before_activation or target in fused.batch_norms
        silent = silent or target in fused.after_copy
        return _epsilon_hooks(rule, "none" if silent else "divide", ratio_args, ratio_inputs=ratio_inputs)
    return _explicit_hooks(rule)


def _capture_hooks(capture: LayerCapture):
    """Hooks that see relevance where it enters the output or leaves through each input."""

    def pre(module, args):
        if not capture.at_input:
            return args
        return tuple(
            _Capture.apply(a, capture.store(i)) if isinstance(a, Tensor) and a.requires_grad else a
            for i, a in enumerate(args)
        )

    def post(module, args, output):
        if isinstance(output, tuple):
            return (post(module, args, output[0]),) + output[1:]
        if capture.at_input or not output.is_floating_point():
            return output
        capture.output_like = (output.shape, output.dtype, output.device)
        return _Capture.apply(output, capture.store(0)) if output.requires_grad else output

    return pre, post


@contextlib.contextmanager
def relevance_hooks(
    gm: fx.GraphModule, assignments: Sequence[RuleAssignment], captures: Sequence[LayerCapture] = ()
) -> Iterator[List[Tensor]]:
    """Install the rule of every assignment on ``gm``'s modules; remove them on exit.

    ``gm``: a working copy borrowed for this call (``PreparedModel.borrow()``),
    never the shared prepared graph, which other calls read at the same time.
    Yields a list that the forward pass fills with the outputs of embedding
    lookups (:class:`~captum_graph.modules.Lookup`), made leaves requiring
    gradients: relevance starts there when the inputs are token ids, so the
    backward pass differentiates with respect to them, too.
    """
    handles = []
    sources: List[Tensor] = []
    by_qualname = {a.qualname: a for a in assignments}
    targets = {str(n.target): n for n in gm.graph.find_nodes(op="call_module")}
    rules = {}
    for target, node in targets.items():
        assignment = by_qualname.get(node.meta.get("qualname", node.name))
        if assignment is not None and assignment.rule is not None:
            rules[target] = assignment.rule
    carrying = {a.qualname for a in assignments}
    fused = fused_ratios(gm, rules, {capture.node_target for capture in captures}, carrying)
    with contextlib.ExitStack() as stack:
        stack.callback(_remove, handles)
        for target, node in targets.items():
            module = gm.get_submodule(target)
            if target in rules:
                handles += _register(module, *_hooks_for(target, rules[target], fused))
                if isinstance(module, Lookup):
                    handles += _register(module, *_source_hooks(sources))
                if is_plain_epsilon(rules[target]):
                    stack.enter_context(_swapped_forward(module, linearized_forward(module, rules[target])))
                elif isinstance(rules[target], (PassThroughRule, IdentityRule)) and not _takes_a_ratio(target, fused):
                    stack.enter_context(_swapped_forward(module, _unrecorded_forward(module), "forward"))
            stack.enter_context(_swapped_forward(module, fused_forward(module, target, fused)))
            for capture in captures:
                if capture.node_target == target:
                    handles += _register(module, *_capture_hooks(capture), outer=True)
        yield sources


def _source_hooks(sources: List[Tensor]):
    """Make a lookup's output a leaf that requires a gradient, and record it in ``sources``."""

    def post(module, args, output):
        if not isinstance(output, Tensor) or output.requires_grad or not output.is_floating_point():
            return output
        source = output.detach().requires_grad_()
        sources.append(source)
        return source

    return None, post


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def _swapped_forward(module: nn.Module, forward: Optional[Callable], attribute: Optional[str] = None) -> Iterator[None]:
    """Run ``forward`` in place of the module's own while LRP runs (``None``: keep it).

    Used for linearised forwards (see ``linearized.py``), fused ReLUs and
    pass-through modules. ``attribute``: the one replaced, by default ``fn``
    of a :class:`~captum_graph.modules.Function` (its keyword arguments are
    still added), else ``forward``.
    """
    if forward is None:
        yield
        return
    attribute = attribute or ("fn" if isinstance(module, Function) else "forward")
    state = module.__dict__  # not setattr: a module's own __setattr__ may forward writes elsewhere
    original = state.get(attribute, _MISSING)
    state[attribute] = forward
    try:
        yield
    finally:
        if original is _MISSING:
            del state[attribute]
        else:
            state[attribute] = original


_MISSING = object()


def _takes_a_ratio(target: str, fused: FusedRatios) -> bool:
    """A pass-through module that takes the ratio of the layer before it, so it records for autograd."""
    return target in fused.relus or target in fused.activations


def _unrecorded_forward(module: nn.Module) -> Callable:
    """The module's forward run without recording for autograd.

    Relevance bypasses a pass-through module (:func:`_pass_hooks`), so nothing
    its forward would save for a backward pass (the intermediates of a GELU
    written out in operations) is needed.
    """
    forward = type(module).forward.__get__(module)

    def unrecorded(*args, **kwargs):
        with torch.no_grad():
            return forward(*args, **kwargs)

    return unrecorded


def _register(module: nn.Module, pre, post, outer: bool = False) -> list:
    """Register hooks; ``outer`` ones wrap the others (first pre-hook, last forward hook)."""
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre, prepend=outer))
    if post is not None:
        handles.append(module.register_forward_hook(post))
    return handles
