"""LRP as one forward and one backward pass over a prepared graph.

Relevance travels backwards as the gradient. Each module with a rule gets two
light autograd functions on the graph's private copy of the module: one on its
output that turns incoming relevance into a ratio (``R / z``), one on each
input that turns the backpropagated ratio into relevance (``x * grad``). With
the epsilon rule this is exact epsilon-LRP at the cost of a plain backward.
Between epsilon layers the two meet in one step (see :class:`FusedRatios`),
and a ReLU there takes the ratio itself, so that per layer the backward pass
allocates one tensor more than a plain backward and keeps nothing more.
Other rules compute input relevance from output relevance in the backward
pass. Nothing is registered on the user's modules.
"""
import contextlib
import dataclasses
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule, PropagationRule
from torch import Tensor, nn

from .cloning import private_copy
from .linearized import linearized_forward
from .modules import Activation, Addition, Function
from .rules import (
    ConstantRule, ExplicitRule, MoveRule, PassThroughRule, RuleAssignment, constant_tensor, init_rule_state, stabilize,
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


class _RatioAtOutput(torch.autograd.Function):
    """Identity forward; backward turns the summed gradient of its readers into the layer's ratio.

    The readers are epsilon layers that leave out their multiplication by this
    value (see :class:`FusedRatios`). ``reuse``: nothing reads ``z`` after this
    step of the backward pass, so the result may take its memory.
    """

    @staticmethod
    def forward(ctx, z: Tensor, epsilon: float, reuse: bool) -> Tensor:
        ctx.save_for_backward(z)
        ctx.epsilon, ctx.reuse = epsilon, reuse
        return z.view_as(z)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
        (z,) = ctx.saved_tensors
        return _ratio_times_value(grad, z, ctx.epsilon, non_negative=False, reuse=ctx.reuse), None, None


class _ReluWithRatio(torch.autograd.Function):
    """``relu(z)``; backward gives the ratio of the epsilon layer that produced ``z``.

    With ``a = relu(z)`` read only by epsilon layers that leave out their
    multiplication by ``a``: where ``z > 0`` ``a == z``, elsewhere the
    relevance is ``0 * ratio``; so ``grad / stab(a) * a`` is that layer's ratio
    and neither ``z`` nor a ReLU mask is needed. ``in_place`` overwrites ``z``
    (only where nothing else reads it and its producer does not keep it). The
    backward step is the last to read ``a`` and takes its memory.
    """

    @staticmethod
    def forward(ctx, z: Tensor, epsilon: float, in_place: bool) -> Tensor:
        if in_place:
            ctx.mark_dirty(z)
            a = torch.relu_(z)
        else:
            a = torch.relu(z)
        ctx.save_for_backward(a)
        ctx.epsilon = epsilon
        return a

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
        (a,) = ctx.saved_tensors
        return _ratio_times_value(grad, a, ctx.epsilon, non_negative=True, reuse=True), None, None


class _BatchNormWithRatio(torch.autograd.Function):
    """An eval-mode batch norm whose readers leave out their multiplication by its output ``y``.

    Backward: the ratio ``grad / stab(y) * y`` times the norm's per-channel
    scale. ``y`` is not kept but recomputed from the input, which the
    backward pass keeps anyway (for the layer before), so that a residual
    addition may add into ``y`` in place, as the plain forward does.
    """

    @staticmethod
    def forward(ctx, x: Tensor, norm: nn.modules.batchnorm._BatchNorm, epsilon: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.norm, ctx.epsilon = norm, epsilon
        return _batch_norm(norm, x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
        (x,) = ctx.saved_tensors
        norm = ctx.norm
        scale = torch.rsqrt(norm.running_var + norm.eps)
        if norm.weight is not None:
            scale = scale * norm.weight
        scale = scale.reshape((1, -1) + (1,) * (x.dim() - 2))
        with torch.set_grad_enabled(grad.requires_grad):  # a double backward records the operations
            ratio = _ratio_times_value(grad, _batch_norm(norm, x), ctx.epsilon, non_negative=False, reuse=True)
        return ratio * scale if grad.requires_grad else ratio.mul_(scale), None, None


def _batch_norm(norm: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, False, 0.0, norm.eps)


def _is_eval_batch_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_var is not None


def _add_in_place(*terms: Tensor) -> Tensor:
    """``Addition``'s forward adding into its first term (which nothing else reads or keeps)."""
    total = terms[0]
    for term in terms[1:]:
        total = total.add_(term)
    return total


def _ratio_times_value(grad: Tensor, value: Tensor, epsilon: float, non_negative: bool, reuse: bool) -> Tensor:
    """``grad / stab(value) * value``, the relevance ratio of the layer that produced ``value``.

    With ``reuse`` the result overwrites ``value`` (no new tensor: on CPUs a
    fresh one costs more in page faults than the arithmetic), computed as
    ``grad / (1 + eps / |value|)`` in three or four passes: exactly 0 where
    ``value == 0``, exactly ``grad`` where ``eps`` is below ``|value|``'s
    rounding, otherwise within a few ulps of the quotient. Without ``reuse``,
    one fresh tensor (the incoming gradient may be shared).
    """
    if grad.requires_grad:  # a double backward records the operations
        return grad / stabilize(value, epsilon) * value
    if not reuse or not isinstance(epsilon, (int, float)):
        result = stabilize(value, epsilon, non_negative)
        torch.div(grad, result, out=result)
        return result.mul_(value)
    value = value.detach()  # the gradient returned must not carry the forward's history
    denominator = value if non_negative else value.abs_()
    eps = constant_tensor(float(epsilon), value.dtype, value.device)
    torch.div(eps, denominator, out=denominator).add_(1)  # 1 + eps / |value| (addcdiv takes twice as long)
    return torch.div(grad, denominator, out=denominator)


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


def _is_plain_epsilon(rule: PropagationRule) -> bool:
    cls = type(rule)
    return (
        isinstance(rule, EpsilonRule)
        and not isinstance(rule, IdentityRule)
        and cls._manipulate_weights is EpsilonRule._manipulate_weights
        and cls._create_backward_hook_input is PropagationRule._create_backward_hook_input
        and cls._create_backward_hook_output is PropagationRule._create_backward_hook_output
    )


class LayerCapture:
    """Collects relevance at one module's output or inputs during the backward pass."""

    def __init__(self, node_target: str, at_input: bool) -> None:
        self.node_target = node_target
        self.at_input = at_input
        self.relevance: Dict[int, Tensor] = {}

    def store(self, index: int) -> Callable[[Tensor], None]:
        def _store(grad: Tensor) -> None:
            self.relevance[index] = grad if index not in self.relevance else self.relevance[index] + grad

        return _store


def _epsilon_hooks(rule: PropagationRule, output: str = "divide", ratio_args: FrozenSet[int] = frozenset(), reuse: bool = False):
    """Multiply by each input (but those at ``ratio_args``) and treat the output.

    ``output``: ``"divide"`` by its stabilised value, ``"ratio"`` (its readers
    leave out their multiplication, :class:`_RatioAtOutput`, which may
    ``reuse`` the output's memory) or ``"none"`` (a ReLU after it takes the
    ratio, :class:`_ReluWithRatio`).
    """
    epsilon = rule.STABILITY_FACTOR

    def pre(module, args):
        return tuple(
            _MultiplyByInput.apply(a) if i not in ratio_args and isinstance(a, Tensor) and a.requires_grad else a
            for i, a in enumerate(args)
        )

    def post(module, args, out):
        if isinstance(out, tuple):  # e.g. attention's (output, weights)
            return (post(module, args, out[0]),) + out[1:]
        if not out.requires_grad:
            return out
        return _DivideByOutput.apply(out, epsilon) if output == "divide" else _RatioAtOutput.apply(out, epsilon, reuse)

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
    # A Captum rule: replay its weight change on a throwaway copy and its hooks.
    target = private_copy(module)
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
        None if g is None else rule._create_backward_hook_input(x.detach())(g) for x, g in zip(inputs, grads)
    ]


def _constant_hooks():
    def post(module, args, output):
        return output.detach()

    return None, post


def _hooks_for(target: str, rule: PropagationRule, fused: "FusedRatios"):
    if isinstance(rule, MoveRule):
        return None, None
    if isinstance(rule, ConstantRule):
        return _constant_hooks()
    if isinstance(rule, (PassThroughRule, IdentityRule)):
        return (None, None) if target in fused.relus else _pass_hooks()
    if _is_plain_epsilon(rule):
        ratio_args = frozenset(fused.ratio_args.get(target, ()))
        if target in fused.at_output:
            return _epsilon_hooks(rule, "ratio", ratio_args, reuse=fused.at_output[target][1])
        silent = target in fused.before_relu or target in fused.batch_norms
        return _epsilon_hooks(rule, "none" if silent else "divide", ratio_args)
    return _explicit_hooks(rule)


def _is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU or (
        type(module) is Activation and module.fn in (F.relu, torch.relu, torch.Tensor.relu) and not module.kwargs
    )


# Layers whose autograd node keeps no reference to their output: a ReLU may overwrite it.
_OUTPUT_NOT_KEPT = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, Addition)


@dataclasses.dataclass
class FusedRatios:
    """Values where an epsilon layer's ratio and its readers' multiplications become one step.

    Exact epsilon-LRP divides relevance by a layer's stabilised output ``z``
    and each reader multiplies it by its input ``z`` again. Where every reader
    of ``z`` is an epsilon layer (without a capture), the readers skip the
    multiplication and one backward step computes ``grad / stab(z) * z`` on
    the summed gradient: the same relevance up to rounding, one fresh tensor
    where there were one per reader plus one. Where ``z`` goes only to a ReLU
    whose output ``a`` is read that way, the ReLU takes the ratio at ``a``
    (equal where ``z > 0``, zero relevance elsewhere), so ``z`` is not kept.
    """

    at_output: Dict[str, Tuple[float, bool]] = dataclasses.field(default_factory=dict)  # layer -> (epsilon, reuse)
    batch_norms: Dict[str, float] = dataclasses.field(default_factory=dict)  # ratio at output, recomputed
    in_place_additions: Set[str] = dataclasses.field(default_factory=set)  # add into a batch norm's output
    relus: Dict[str, Tuple[float, bool]] = dataclasses.field(default_factory=dict)  # relu -> (epsilon, in place)
    before_relu: Set[str] = dataclasses.field(default_factory=set)  # layers whose ratio a ReLU takes
    ratio_args: Dict[str, Set[int]] = dataclasses.field(default_factory=dict)  # reader -> positions skipped


def fused_ratios(gm: fx.GraphModule, rules: Dict[str, PropagationRule], captured: Set[str]) -> FusedRatios:
    """Plan the fused ratios of ``gm`` under ``rules``; nodes in ``captured`` keep the plain order."""
    fused = FusedRatios()
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target in captured or not _is_plain_epsilon(rules.get(node.target)):
            continue
        epsilon = rules[node.target].STABILITY_FACTOR
        output_not_kept = isinstance(gm.get_submodule(node.target), _OUTPUT_NOT_KEPT)
        relu = _single_relu_reader(gm, node, rules, captured)
        if relu is not None and _read_by_epsilon_layers(relu, rules, captured):
            fused.relus[relu.target], value = (epsilon, output_not_kept), relu
            fused.before_relu.add(node.target)
        elif _read_by_epsilon_layers(node, rules, captured):
            value = node
            if _is_eval_batch_norm(gm.get_submodule(node.target)):
                fused.batch_norms[node.target] = epsilon
                if _can_add_in_place(gm, node):
                    fused.in_place_additions.add(next(iter(node.users)).target)
            else:
                fused.at_output[node.target] = (epsilon, output_not_kept)
        else:
            continue
        for reader in value.users:
            positions = {i for i, arg in enumerate(reader.args) if arg is value}
            fused.ratio_args.setdefault(reader.target, set()).update(positions)
    return fused


def _can_add_in_place(gm: fx.GraphModule, norm: fx.Node) -> bool:
    """Whether the only reader of ``norm`` is an ``Addition`` whose first term it is (and only that)."""
    if len(norm.users) != 1:
        return False
    (addition,) = norm.users
    module = gm.get_submodule(addition.target)
    return type(module) is Addition and module.alpha == 1 and addition.args[:1] == (norm,) and addition.args.count(norm) == 1


def _single_relu_reader(gm: fx.GraphModule, node: fx.Node, rules, captured: Set[str]) -> Optional[fx.Node]:
    """The ReLU (pass-through rule, no capture) that is ``node``'s only reader, if any."""
    if len(node.users) != 1:
        return None
    (relu,) = node.users
    if relu.op != "call_module" or relu.target in captured or relu.args != (node,) or relu.kwargs:
        return None
    if not _is_relu(gm.get_submodule(relu.target)):
        return None
    return relu if isinstance(rules.get(relu.target), (PassThroughRule, IdentityRule)) else None


def _read_by_epsilon_layers(value: fx.Node, rules: Dict[str, PropagationRule], captured: Set[str]) -> bool:
    """Whether every reader of ``value`` is an epsilon layer taking it positionally, without a capture."""
    return bool(value.users) and all(
        reader.op == "call_module"
        and reader.target not in captured
        and _is_plain_epsilon(rules.get(reader.target))
        and value in reader.args
        and value not in reader.kwargs.values()
        for reader in value.users
    )


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
        if capture.at_input or not output.requires_grad:
            return output
        return _Capture.apply(output, capture.store(0))

    return pre, post


@contextlib.contextmanager
def relevance_hooks(
    gm: fx.GraphModule, assignments: Sequence[RuleAssignment], captures: Sequence[LayerCapture] = ()
) -> Iterator[None]:
    """Install the rule of every assignment on ``gm``'s modules; remove them on exit."""
    handles = []
    by_qualname = {a.qualname: a for a in assignments}
    targets = {str(n.target): n for n in gm.graph.find_nodes(op="call_module")}
    rules = {}
    for target, node in targets.items():
        assignment = by_qualname.get(node.meta.get("qualname", node.name))
        if assignment is not None and assignment.rule is not None:
            rules[target] = assignment.rule
    fused = fused_ratios(gm, rules, {capture.node_target for capture in captures})
    with contextlib.ExitStack() as stack:
        stack.callback(_remove, handles)
        for target, node in targets.items():
            module = gm.get_submodule(target)
            if target in rules:
                handles += _register(module, *_hooks_for(target, rules[target], fused))
                if _is_plain_epsilon(rules[target]):
                    stack.enter_context(_swapped_forward(module, linearized_forward(module)))
            stack.enter_context(_swapped_forward(module, _fused_forward(module, target, fused)))
            for capture in captures:
                if capture.node_target == target:
                    handles += _register(module, *_capture_hooks(capture), outer=True)
        yield


def _fused_forward(module: nn.Module, target: str, fused: FusedRatios) -> Optional[Callable]:
    """The forward that ``fused`` asks of this module, if any."""
    if target in fused.relus:
        epsilon, in_place = fused.relus[target]
        return lambda z: _ReluWithRatio.apply(z, epsilon, in_place)
    if target in fused.batch_norms:
        return lambda x: _BatchNormWithRatio.apply(x, module, fused.batch_norms[target])
    if target in fused.in_place_additions:
        return _add_in_place
    return None


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def _swapped_forward(module: nn.Module, forward: Optional[Callable]) -> Iterator[None]:
    """Run ``forward`` in place of the module's own while LRP runs (``None``: keep it).

    Used for linearised forwards (see ``linearized.py``) and fused ReLUs.
    """
    if forward is None:
        yield
        return
    attribute = "fn" if isinstance(module, Function) else "forward"
    original = module.__dict__.get(attribute, _MISSING)
    setattr(module, attribute, forward)
    try:
        yield
    finally:
        if original is _MISSING:
            delattr(module, attribute)
        else:
            setattr(module, attribute, original)


_MISSING = object()


def _register(module: nn.Module, pre, post, outer: bool = False) -> list:
    """Register hooks; ``outer`` ones wrap the others (first pre-hook, last forward hook)."""
    handles = []
    if pre is not None:
        handles.append(module.register_forward_pre_hook(pre, prepend=outer))
    if post is not None:
        handles.append(module.register_forward_hook(post))
    return handles
