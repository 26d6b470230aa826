"""LRP as one forward and one backward pass over a prepared graph.

Relevance travels backwards as the gradient. Each module with a rule gets two
light autograd functions on the graph's private copy of the module: one on its
output that turns incoming relevance into a ratio (``R / z``), one on each
input that turns the backpropagated ratio into relevance (``x * grad``). With
the epsilon rule this is exact epsilon-LRP at the cost of a plain backward.
Where an epsilon layer feeds only a ReLU whose output only epsilon layers
read, the ratio is taken at the ReLU's output instead (see
:func:`_ratio_after_relu`): the same numbers, one tensor fewer kept per layer.
Other rules compute input relevance from output relevance in the backward
pass. Nothing is registered on the user's modules.
"""
import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule, PropagationRule
from torch import Tensor, nn

from .cloning import private_copy
from .linearized import linearized_forward
from .modules import Activation, Function
from .rules import ConstantRule, ExplicitRule, MoveRule, PassThroughRule, RuleAssignment, init_rule_state, stabilize

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


def _epsilon_hooks(rule: PropagationRule, divide: bool = True):
    """Multiply by each input, divide by the stabilised output (unless a ReLU after it does)."""
    epsilon = rule.STABILITY_FACTOR

    def pre(module, args):
        return tuple(
            _MultiplyByInput.apply(a) if isinstance(a, Tensor) and a.requires_grad else a for a in args
        )

    def post(module, args, output):
        if isinstance(output, tuple):  # e.g. attention's (output, weights)
            return (post(module, args, output[0]),) + output[1:]
        return _DivideByOutput.apply(output, epsilon) if output.requires_grad else output

    return pre, post if divide else None


def _pass_hooks(epsilon: Optional[float] = None):
    """Hand relevance to the input unchanged; with ``epsilon``, first divide it by the stabilised output."""

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
        passed = _PassThrough.apply(first, output)
        return passed if epsilon is None else _DivideByOutput.apply(passed, epsilon)

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


def _hooks_for(rule: PropagationRule, ratio_moved: bool, ratio_epsilon: Optional[float]):
    """The hooks of ``rule``; ``ratio_moved``/``ratio_epsilon``: see :func:`_ratio_after_relu`."""
    if isinstance(rule, MoveRule):
        return None, None
    if isinstance(rule, ConstantRule):
        return _constant_hooks()
    if isinstance(rule, (PassThroughRule, IdentityRule)):
        return _pass_hooks(ratio_epsilon)
    if _is_plain_epsilon(rule):
        return _epsilon_hooks(rule, divide=not ratio_moved)
    return _explicit_hooks(rule)


def _is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU or (
        type(module) is Activation and module.fn in (F.relu, torch.relu, torch.Tensor.relu) and not module.kwargs
    )


def _ratio_after_relu(gm: fx.GraphModule, rules: Dict[str, PropagationRule], captured: set) -> Dict[str, str]:
    """Epsilon layers whose ratio ``R / (z + eps sign z)`` can be taken after the ReLU that follows.

    For a layer ``z = f(x)`` whose only reader is ``a = relu(z)``, read only by
    epsilon layers (which multiply the relevance by ``a``): where ``z > 0``,
    ``a == z``; elsewhere the relevance arriving is ``0 * ratio``, zero either
    way. Dividing at ``a`` gives the same numbers, and ``z`` need not be kept
    for the backward pass. Returns ``{layer target: relu target}``; nodes with
    a layer capture keep the plain order (a capture reads relevance between them).
    """
    moved = {}
    for node in gm.graph.find_nodes(op="call_module"):
        rule, users = rules.get(node.target), list(node.users)
        if rule is None or not _is_plain_epsilon(rule) or len(users) != 1 or node.target in captured:
            continue
        relu = users[0]
        if relu.op != "call_module" or relu.target in captured or relu.args[:1] != (node,) or len(relu.args) != 1:
            continue
        if not _is_relu(gm.get_submodule(relu.target)) or not isinstance(rules.get(relu.target), (PassThroughRule, IdentityRule)):
            continue
        readers = list(relu.users)
        if readers and all(_multiplies_by(reader, relu, rules) for reader in readers):
            moved[node.target] = relu.target
    return moved


def _multiplies_by(reader: fx.Node, value: fx.Node, rules: Dict[str, PropagationRule]) -> bool:
    """Whether ``reader`` is an epsilon layer taking ``value`` as a plain positional argument."""
    rule = rules.get(reader.target) if reader.op == "call_module" else None
    return rule is not None and _is_plain_epsilon(rule) and value in reader.args and value not in reader.kwargs.values()


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
    moved = _ratio_after_relu(gm, rules, {capture.node_target for capture in captures})
    epsilon_after = {relu: rules[layer].STABILITY_FACTOR for layer, relu in moved.items()}
    with contextlib.ExitStack() as stack:
        stack.callback(_remove, handles)
        for target, node in targets.items():
            module = gm.get_submodule(target)
            if target in rules:
                handles += _register(module, *_hooks_for(rules[target], target in moved, epsilon_after.get(target)))
                if _is_plain_epsilon(rules[target]):
                    stack.enter_context(_linearized(module))
            for capture in captures:
                if capture.node_target == target:
                    handles += _register(module, *_capture_hooks(capture), outer=True)
        yield


def _remove(handles: list) -> None:
    for handle in handles:
        handle.remove()


@contextlib.contextmanager
def _linearized(module: nn.Module) -> Iterator[None]:
    """Swap in the module's linearised forward (see ``linearized.py``) while LRP runs."""
    forward = linearized_forward(module)
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
