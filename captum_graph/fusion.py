"""Fused relevance ratios between epsilon layers: the plan and its autograd functions.

Exact epsilon-LRP divides the relevance at a layer by its stabilised output
``z`` and multiplies it by ``z`` again at each layer that reads ``z``. Where
every reader is an epsilon layer (directly or through concatenations),
:func:`fused_ratios` plans one backward step instead, ``grad / stab(z) * z``,
computed in ``z``'s own memory after its last reader is done with it; a ReLU
in between takes that step itself and runs in place, and a batch norm feeding
a residual sum recomputes its output so that the sum adds into it in place.
Where ``z`` is copied on its way to the readers (attention's packed
projections made contiguous, windows cut out of a feature map), the readers
take the step on the copy they keep anyway, so that ``z`` itself is freed.
The engine (``engine.py``) installs the plan.
"""
import dataclasses
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule, IdentityRule, PropagationRule
from torch import Tensor, nn

from . import modules as M
from .modules import Activation, Addition, Concatenate
from .passes import moves_data
from .rules import MoveRule, PassThroughRule, constant_tensor, stabilize

__all__ = ["FusedRatios", "fused_ratios", "fused_forward", "is_plain_epsilon", "RatioAtOutput", "RatioOfRecomputedSum"]

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Layers that return a fresh tensor their autograd node does not keep: once its readers are
# done, the backward pass may overwrite it. Exact types: a subclass may override ``forward``.
_OUTPUT_NOT_KEPT = frozenset(
    (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear, Addition)
    + _BATCH_NORMS
    + (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
    + (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
)
# The same for ATen operations the graph calls as ``LinearFunction`` (``F.linear`` inside attention).
_OPERATIONS_NOT_KEEPING_OUTPUT = frozenset(
    (torch.ops.aten.linear, torch.ops.aten.conv1d, torch.ops.aten.conv2d, torch.ops.aten.conv3d)
)


# Modules that return their input unchanged in eval mode.
_IDENTITIES = frozenset((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout))


class RatioAtOutput(torch.autograd.Function):
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


class RatioOfRecomputedSum(torch.autograd.Function):
    """Identity forward on an addition's output ``s``; backward turns the gradient into its ratio.

    As :class:`RatioAtOutput`, but ``s`` is not kept: it is recomputed from
    the terms, which other steps of the backward pass keep anyway (the
    layers that produced them take their ratio at their outputs). ``add`` is
    the addition's own forward, so the sum is the same bit for bit.
    """

    @staticmethod
    def forward(ctx, s: Tensor, epsilon: float, add: Callable[..., Tensor], *terms: Tensor) -> Tensor:
        ctx.save_for_backward(*terms)
        ctx.epsilon, ctx.add = epsilon, add
        return s.view_as(s)

    @staticmethod
    def backward(ctx, grad: Tensor):
        with torch.set_grad_enabled(grad.requires_grad):  # a double backward records the operations
            s = ctx.add(*ctx.saved_tensors)
        ratio = _ratio_times_value(grad, s, ctx.epsilon, non_negative=False, reuse=True)
        return (ratio, None, None) + (None,) * len(ctx.saved_tensors)


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


class _ActivationWithRatio(torch.autograd.Function):
    """``a = activation(z)`` for an activation that passes relevance unchanged; backward gives the
    ratio of the epsilon layer that produced ``z``.

    Its readers leave out their multiplication by ``a``: the relevance at
    ``a`` is ``grad * a``, it passes to ``z`` unchanged, and that layer
    divides it by ``stab(z)``. One step, ``a / stab(z) * grad``, in one
    fresh tensor where the plain order makes two. Both ``z`` and ``a`` are
    kept, as the activation's own backward and its readers' keep them.
    """

    @staticmethod
    def forward(ctx, z: Tensor, activation: Callable[[Tensor], Tensor], epsilon: float) -> Tensor:
        a = activation(z)
        a = z.view_as(z) if a is z else a
        ctx.save_for_backward(z, a)
        ctx.epsilon = epsilon
        return a

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tuple[Tensor, None, None]:
        z, a = ctx.saved_tensors
        if grad.requires_grad:  # a double backward records the operations
            return grad * a / stabilize(z, ctx.epsilon), None, None
        ratio = stabilize(z, ctx.epsilon)
        torch.div(a, ratio, out=ratio)
        return ratio.mul_(grad), None, None


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
    return type(module) in _BATCH_NORMS and not module.training and module.running_var is not None


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


def is_plain_epsilon(rule: PropagationRule) -> bool:
    """Whether ``rule`` is Captum's epsilon rule as written (no subclass changing weights or hooks)."""
    cls = type(rule)
    return (
        isinstance(rule, EpsilonRule)
        and not isinstance(rule, IdentityRule)
        and cls._manipulate_weights is EpsilonRule._manipulate_weights
        and cls._create_backward_hook_input is PropagationRule._create_backward_hook_input
        and cls._create_backward_hook_output is PropagationRule._create_backward_hook_output
    )


_RELUS = (F.relu, torch.relu, torch.Tensor.relu)


def _is_relu(module: nn.Module) -> bool:
    return type(module) is nn.ReLU or (
        type(module) is Activation
        and (module.fn in _RELUS or getattr(module.fn, "overloadpacket", None) is torch.ops.aten.relu)
        and module.kwargs in ({}, {"inplace": False})
    )


@dataclasses.dataclass
class FusedRatios:
    """Values where an epsilon layer's ratio and its readers' multiplications become one step.

    Exact epsilon-LRP divides relevance by a layer's stabilised output ``z``
    and each reader multiplies it by its input ``z`` again. Where every reader
    of ``z`` is an epsilon layer (without a capture), the readers skip the
    multiplication and one backward step computes ``grad / stab(z) * z`` on
    the summed gradient: the same relevance up to rounding. Readers may also
    take ``z`` through data movement (reshapes, views, selections: attention's
    packed projections), eval-mode dropout and identities, and through
    concatenations (DenseNet), as long as every part of those is fused too. Where ``z`` goes only to a ReLU whose output ``a`` is
    read that way, the ReLU takes the ratio at ``a`` (equal where ``z > 0``,
    zero relevance elsewhere), so ``z`` is not kept; another activation that
    passes relevance unchanged (GELU, SiLU) takes the ratio as one step from
    ``a`` and ``z``, which it keeps anyway. An addition whose terms
    are all kept by their own layers' steps recomputes its sum for its ratio
    (``recomputed_sums``) instead of keeping it. Where ``z`` is copied
    on its way (a move whose output has memory of its own, see
    :func:`_last_copy`), the step is taken on the copy, at each reader's
    argument (``at_inputs``): the factor ``z / stab(z)`` is elementwise and
    the step linear in the gradient, so it commutes with data movement and
    with the sum over readers; the readers usually keep the copy for their own
    backward (attention keeps its values, a linear layer its input), and the
    producer's ``z`` is freed after the copy.
    """

    at_output: Dict[str, Tuple[float, bool]] = dataclasses.field(default_factory=dict)  # layer -> (epsilon, reuse)
    batch_norms: Dict[str, float] = dataclasses.field(default_factory=dict)  # ratio at output, recomputed
    in_place_additions: Set[str] = dataclasses.field(default_factory=set)  # add into a batch norm's output
    relus: Dict[str, Tuple[float, bool]] = dataclasses.field(default_factory=dict)  # relu -> (epsilon, in place)
    before_relu: Set[str] = dataclasses.field(default_factory=set)  # layers whose ratio a ReLU takes
    activations: Dict[str, float] = dataclasses.field(default_factory=dict)  # other activation -> epsilon
    before_activation: Set[str] = dataclasses.field(default_factory=set)  # layers whose ratio one of those takes
    ratio_args: Dict[str, Set[int]] = dataclasses.field(default_factory=dict)  # reader -> positions skipped
    # addition -> epsilon: its ratio at output, the sum recomputed from terms that other steps keep
    recomputed_sums: Dict[str, float] = dataclasses.field(default_factory=dict)
    after_copy: Set[str] = dataclasses.field(default_factory=set)  # layers whose ratio their readers take on a copy
    # reader -> {position: (epsilon, reuse)}: the ratio of a copied value, taken on that argument
    at_inputs: Dict[str, Dict[int, Tuple[float, bool]]] = dataclasses.field(default_factory=dict)


def fused_ratios(
    gm: fx.GraphModule, rules: Dict[str, PropagationRule], captured: Set[str], carrying: Optional[Set[str]] = None
) -> FusedRatios:
    """Plan the fused ratios of ``gm`` under ``rules``; nodes in ``captured`` keep the plain order.

    ``carrying``: the qualified names of the nodes relevance reaches; a reader
    outside it (a query projection under CP-LRP, the variance of a norm) takes
    no relevance and does not stand in the way of a fused step.
    """
    walk = _Walk(gm, rules, captured, carrying)
    values = {}  # epsilon layer -> the value its readers take unmultiplied (its output or its activation's)
    for node in gm.graph.find_nodes(op="call_module"):
        if node.target in captured or not is_plain_epsilon(rules.get(node.target)):
            continue
        activation = _single_activation_reader(gm, node, rules, captured)
        if activation is not None and walk.uses(activation) is not None:
            values[node] = activation
        elif walk.uses(node) is not None:
            values[node] = node
    _drop_partly_fused_concatenations(values, walk)
    fused = FusedRatios()
    for node, value in values.items():
        _plan_layer(fused, gm, walk, node, value, rules[node.target].STABILITY_FACTOR)
        for reader, position in walk.uses(value)[0]:
            fused.ratio_args.setdefault(reader.target, set()).add(position)
    _plan_recomputed_sums(fused, gm, walk, values)
    return fused


def _plan_recomputed_sums(
    fused: FusedRatios, gm: fx.GraphModule, walk: "_Walk", values: Dict[fx.Node, fx.Node]
) -> None:
    """Additions, in graph order, whose terms are all values that a step keeps whole: outputs with
    their ratio at output, ReLU outputs with theirs (not sums that are recomputed themselves)."""
    kept = {node for node in values if node.target in fused.at_output} | {v for n, v in values.items() if v is not n}
    for node in gm.graph.find_nodes(op="call_module"):
        if node not in kept or type(gm.get_submodule(node.target)) is not Addition or len(node.args) < 2:
            continue
        if node.kwargs or node.target in fused.in_place_additions:
            continue
        if all(_kept_whole(term, kept, walk) for term in node.args):
            fused.recomputed_sums[node.target] = fused.at_output.pop(node.target)[0]
            kept.discard(node)


def _kept_whole(term: Any, kept: Set[fx.Node], walk: "_Walk") -> bool:
    """Whether ``term`` is a value in ``kept``, or a view of one (moves and identities that copy nothing)."""
    while isinstance(term, fx.Node) and term not in kept:
        source = term.args[0] if term.args else None
        if not isinstance(source, fx.Node) or not (_moves_only(term, source) or walk.is_identity(term, source)):
            return False
        if _has_own_memory(term, source):
            return False
        term = source
    return isinstance(term, fx.Node)


def _plan_layer(
    fused: FusedRatios, gm: fx.GraphModule, walk: "_Walk", node: fx.Node, value: fx.Node, epsilon: float
) -> None:
    module = gm.get_submodule(node.target)
    output_not_kept = _output_not_kept(module)
    if value is not node and _is_relu(gm.get_submodule(value.target)):
        fused.relus[value.target] = (epsilon, output_not_kept)
        fused.before_relu.add(node.target)
    elif value is not node:
        fused.activations[value.target] = epsilon
        fused.before_activation.add(node.target)
    elif _is_eval_batch_norm(module):
        fused.batch_norms[node.target] = epsilon
        if _can_add_in_place(gm, node):
            fused.in_place_additions.add(next(iter(node.users)).target)
    else:
        # Only where the layer keeps no ``z`` itself is the step better taken on the copy (``z`` is then freed).
        copy = _last_copy(node, walk) if output_not_kept else None
        if copy is None:
            fused.at_output[node.target] = (epsilon, output_not_kept)
        else:
            fused.after_copy.add(node.target)
            _plan_after_copy(fused, gm, walk.uses(copy)[0], epsilon)


def _output_not_kept(module: nn.Module) -> bool:
    """Whether ``module`` returns a fresh tensor that its own backward does not keep (exact types)."""
    if type(module) is M.LinearFunction:
        return getattr(module.fn, "overloadpacket", None) in _OPERATIONS_NOT_KEEPING_OUTPUT
    return type(module) in _OUTPUT_NOT_KEPT


def _plan_after_copy(fused: FusedRatios, gm: fx.GraphModule, uses: List[Tuple[fx.Node, int]], epsilon: float) -> None:
    """The ratio of a copied value, taken by its readers on their arguments (the copy)."""
    takers = [(reader, i) for reader, i in uses if i not in _constant_inputs(gm, reader)]
    # Overwriting the copy is safe once the one reader taking the step has run its backward, if that
    # reader alone reads the copy (it keeps the other views for itself: attention's queries and keys).
    reuse = len(takers) == 1 and len({reader for reader, _ in uses}) == 1
    for reader, i in takers:
        fused.at_inputs.setdefault(reader.target, {})[i] = (epsilon, reuse)


def _constant_inputs(gm: fx.GraphModule, reader: fx.Node) -> Set[int]:
    """The argument positions of ``reader`` that relevance never enters."""
    constant = getattr(gm.get_submodule(reader.target), "constant_inputs", ())
    return set(range(len(reader.args))) if constant == "all" else set(constant)


def _last_copy(node: fx.Node, walk: "_Walk") -> Optional[fx.Node]:
    """The last copy of ``node``'s value on the one path it takes before it branches, if any.

    The path follows single readers that only move the value (views,
    reshapes, eval-mode identities); a copy is a move whose captured output
    (``meta["val"]``) has memory of its own. ``None`` where the value is not
    copied, or reaches a concatenation (whose parts take their ratio alone).
    """
    copy, current = None, node
    while len(current.users) == 1:
        (reader,) = current.users
        if not (_moves_only(reader, current) or walk.is_identity(reader, current)):
            break
        if _has_own_memory(reader, current):
            copy = reader
        current = reader
    if copy is None or walk.uses(copy)[1]:
        return None
    return copy


def _has_own_memory(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node``'s captured value shares no memory with ``source``'s (a copy, not a view)."""
    value, original = node.meta.get("val"), source.meta.get("val")
    if not isinstance(value, torch.Tensor) or not isinstance(original, torch.Tensor):
        return False
    # torch private API, also used by torch's own fake-tensor passes; tests/unit/test_memory.py fails if it moves
    return not torch._C._is_alias_of(value, original)


class _Walk:
    """Where a value goes: to epsilon layers, directly or through concatenations."""

    def __init__(
        self, gm: fx.GraphModule, rules: Dict[str, PropagationRule], captured: Set[str], carrying: Optional[Set[str]] = None
    ) -> None:
        self.gm, self.rules, self.captured, self.carrying = gm, rules, captured, carrying

    def uses(self, value: fx.Node) -> Optional[Tuple[List[Tuple[fx.Node, int]], List[fx.Node]]]:
        """``(epsilon layer, argument position)`` for every use, and the concatenations passed; ``None``
        if some use is anything else (or has a capture)."""
        if not value.users:
            return None
        uses, concatenations = [], []
        for reader in value.users:
            if _moves_only(reader, value) or self.is_identity(reader, value):  # its readers read the value
                further = self.uses(reader)
                if further is None:
                    return None
                uses += further[0]
                concatenations += further[1]
            elif self.is_concatenation(reader):
                further = self.uses(reader)
                if further is None:
                    return None
                uses += further[0]
                concatenations += [reader] + further[1]
            elif self._is_epsilon_reader(reader, value):
                uses += [(reader, i) for i, arg in enumerate(reader.args) if arg is value]
            elif self._takes_no_relevance(reader):
                continue  # relevance never flows back through it
            else:
                return None
        return uses, concatenations

    def _takes_no_relevance(self, reader: fx.Node) -> bool:
        """A reader that relevance does not reach (the graph's output takes it all)."""
        if self.carrying is None or reader.op not in ("call_module", "call_function"):
            return False
        return reader.meta.get("qualname", reader.name) not in self.carrying

    def is_identity(self, node: fx.Node, value: fx.Node) -> bool:
        """An eval-mode dropout or identity module on ``value`` with a pass-through rule and no capture."""
        if node.op != "call_module" or node.target in self.captured or node.args != (value,) or node.kwargs:
            return False
        module = self.gm.get_submodule(node.target)
        return (
            type(module) in _IDENTITIES
            and not module.training
            and isinstance(self.rules.get(node.target), (PassThroughRule, IdentityRule))
        )

    def is_concatenation(self, node: fx.Node) -> bool:
        """A concatenation that moves relevance (``MoveRule``) and has no capture."""
        return (
            node.op == "call_module"
            and node.target not in self.captured
            and isinstance(self.gm.get_submodule(node.target), Concatenate)
            and isinstance(self.rules.get(node.target), MoveRule)
            and not node.kwargs
        )

    def _is_epsilon_reader(self, reader: fx.Node, value: fx.Node) -> bool:
        return (
            reader.op == "call_module"
            and reader.target not in self.captured
            and is_plain_epsilon(self.rules.get(reader.target))
            and value in reader.args
            and value not in reader.kwargs.values()
        )


def _moves_only(node: fx.Node, value: fx.Node) -> bool:
    """Whether ``node`` only moves ``value`` (a view, a reshape, a selection) and reads no other tensor."""
    return moves_data(node) and node.args[:1] == (value,) and all(
        arg is value or not isinstance(arg.meta.get("val"), torch.Tensor) for arg in node.all_input_nodes
    )


def _drop_partly_fused_concatenations(values: Dict[fx.Node, fx.Node], walk: _Walk) -> None:
    """Keep only layers whose concatenations are made of fused values alone.

    A concatenation's readers leave out their multiplication for all its parts
    or for none, so a layer reaching one with a part that is not fused (the
    model's input, say) keeps the plain order, which may in turn exclude others.
    """

    def complete(concatenation: fx.Node, fused_values: Set[fx.Node]) -> bool:
        return all(
            part in fused_values or (walk.is_concatenation(part) and complete(part, fused_values))
            for part in concatenation.args
        )

    while True:
        fused_values = set(values.values())
        dropped = [node for node, value in values.items() if not all(complete(c, fused_values) for c in walk.uses(value)[1])]
        if not dropped:
            return
        for node in dropped:
            del values[node]


def _can_add_in_place(gm: fx.GraphModule, norm: fx.Node) -> bool:
    """Whether the only reader of ``norm`` is an ``Addition`` whose first term it is (and only that)."""
    if len(norm.users) != 1:
        return False
    (addition,) = norm.users
    if addition.op != "call_module":  # read through a view: not the addition's own memory
        return False
    module = gm.get_submodule(addition.target)
    return type(module) is Addition and module.alpha == 1 and addition.args[:1] == (norm,) and addition.args.count(norm) == 1


def _single_activation_reader(gm: fx.GraphModule, node: fx.Node, rules, captured: Set[str]) -> Optional[fx.Node]:
    """The activation (pass-through rule, no capture) that is ``node``'s only reader, if any.

    A ReLU, or any other module with that rule that maps ``node`` alone to
    a tensor of its shape without writing into it (GELU, SiLU; not an
    in-place one, whose input the step needs; not an identity, which the
    readers see through anyway).
    """
    if len(node.users) != 1:
        return None
    (activation,) = node.users
    if activation.op != "call_module" or activation.target in captured:
        return None
    if not isinstance(rules.get(activation.target), (PassThroughRule, IdentityRule)):
        return None
    module = gm.get_submodule(activation.target)
    if _is_relu(module):
        return activation if activation.args == (node,) and not activation.kwargs else None
    arguments = activation.args[1:] + tuple(activation.kwargs.values())
    if activation.args[:1] != (node,) or any(isinstance(a, fx.Node) for a in arguments):
        return None
    in_place = getattr(module, "inplace", False) or getattr(module, "kwargs", {}).get("inplace", False)
    identity = type(module) in _IDENTITIES or isinstance(module, nn.Identity)
    value, output = node.meta.get("val"), activation.meta.get("val")
    same_shape = isinstance(value, Tensor) and isinstance(output, Tensor) and value.shape == output.shape
    return activation if same_shape and not in_place and not identity else None


def fused_forward(module: nn.Module, target: str, fused: FusedRatios) -> Optional[Callable]:
    """The forward that ``fused`` asks of this module, if any."""
    if target in fused.relus:
        epsilon, in_place = fused.relus[target]
        return lambda z, inplace=False: _ReluWithRatio.apply(z, epsilon, in_place)  # ``Activation`` passes ``inplace``
    if target in fused.activations:
        epsilon = fused.activations[target]
        original = module.fn if isinstance(module, M.Function) else module.forward
        return lambda z, *args, **kwargs: _ActivationWithRatio.apply(z, lambda x: original(x, *args, **kwargs), epsilon)
    if target in fused.batch_norms:
        return lambda x: _BatchNormWithRatio.apply(x, module, fused.batch_norms[target])
    if target in fused.in_place_additions:
        return _add_in_place
    return None
