"""``LRP`` and ``LayerLRP``: Captum's classes, run on the rewritten graph."""
import typing
from typing import Any, List, Literal, Mapping, Optional, Sequence, Tuple, Union

import torch
from captum._utils.common import _format_output, _format_tensor_into_tuples, _is_tuple, _run_forward
from captum._utils.typing import TargetType, TensorOrTupleOfTensorsGeneric
from captum.attr import LayerLRP as _CaptumLayerLRP
from captum.attr import LRP as _CaptumLRP
from captum.attr._utils.lrp_rules import PropagationRule
from torch import Tensor, nn

from ..engine import LayerCapture, relevance_hooks
from ..errors import NonFiniteError
from ..finite import check_finite_inputs, is_finite, locate_non_finite
from ..layers import LayerSpec, check_layer_spec, resolve_layer
from ..prepare import PreparedModel, prepare
from ._args import call_arguments
from ..rules import (
    ConstantRule,
    Preset,
    RuleAssignment,
    RuleKey,
    assign_rules,
    preset_folds_batch_norm,
    raise_for_problems,
    validate_rules,
)

__all__ = ["LRP", "LayerLRP"]


class _GraphLRPMixin:
    """What LRP and LayerLRP share: rules, the prepared graph, one forward-backward."""

    model: nn.Module

    def _init_rules(
        self,
        rules: Optional[Mapping[RuleKey, PropagationRule]],
        preset: Union[str, Preset, None],
        fold_batch_norm: Optional[bool],
    ) -> None:
        validate_rules(rules or {}, preset)  # names are checked against the graph at the call
        self.rules = dict(rules or {})
        self.preset = preset
        self.fold_batch_norm = preset_folds_batch_norm(preset) if fold_batch_norm is None else fold_batch_norm

    def prepared(self, inputs: Any = None, additional_forward_args: Any = None) -> PreparedModel:
        """The rewritten graph of the model at these inputs (cached; rebuilt when the model changes).

        ``inputs=None`` takes an example image (see :func:`captum_graph.prepare`).
        ``additional_forward_args`` are held constant: no relevance flows into them.
        """
        if inputs is None:
            return prepare(self.model, None, self.fold_batch_norm)
        explained = len(_format_tensor_into_tuples(inputs))
        return prepare(self.model, call_arguments(inputs, additional_forward_args), self.fold_batch_norm, explained=explained)

    def rule_report(self, inputs: Any = None, additional_forward_args: Any = None) -> List[RuleAssignment]:
        """Which rule each node gets and why at these inputs; unsupported nodes have ``problem`` set."""
        return self._rule_report(self.prepared(inputs, additional_forward_args))

    def _rule_report(self, prepared: PreparedModel) -> List[RuleAssignment]:
        return assign_rules(prepared.graph_module, self.rules, self.preset, prepared.origins)

    def _assignments(self, prepared: PreparedModel, verbose: bool) -> List[RuleAssignment]:
        assignments = self._rule_report(prepared)
        raise_for_problems(assignments)
        if verbose:
            for a in assignments:
                print(f"Applied {a.rule_name} on {a.qualname} ({a.module_type or 'function'}, {a.source})")
        return assignments

    def _relevance_pass(
        self,
        inputs: Tuple[Tensor, ...],
        target: TargetType,
        additional_forward_args: Any,
        verbose: bool,
        captures: Sequence[LayerCapture] = (),
        prepared: Optional[PreparedModel] = None,
    ) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Run forward and backward once; return target outputs and input relevance.

        Runs on a working copy of the prepared graph borrowed for this call,
        with leaf aliases of the inputs (the caller's tensors keep their
        ``requires_grad``, also for other threads using them). Relevance
        starts as the target output itself (a layer whose rows are not the
        examples, such as Swin's windows, then needs no rescaling) and, with
        token ids as inputs, at the rows the embedding lookups return.

        Raises:
            NonFiniteError: an input holds NaN or infinite values, or the
                relevance computed from finite inputs does (naming the node).
        """
        check_finite_inputs(inputs)
        if prepared is None:
            prepared = self.prepared(inputs, additional_forward_args)  # once per call: the cache check fingerprints the model
        assignments = self._assignments(prepared, verbose)
        inputs = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)
        floating = tuple(x for x in inputs if x.is_floating_point())  # token ids carry none
        with prepared.borrow() as gm:
            with relevance_hooks(gm, assignments, captures) as sources, torch.enable_grad():
                outputs = _run_forward(gm, inputs, target, additional_forward_args)
                if not outputs.requires_grad:
                    raise _no_relevance_path(self.model, inputs, assignments)
                if outputs.dim() == 0:
                    raise ValueError(
                        f"LRP on {type(self.model).__name__}: the target output is one value for the whole "
                        "batch; relevance is explained per example. Return one output per example (Captum's "
                        "target then selects among them)."
                    )
                grads = torch.autograd.grad(outputs, floating + tuple(sources), outputs.detach(), allow_unused=True)
            captured = tuple(r for capture in captures for r in capture.relevance.values())
            if not is_finite((outputs,) + tuple(g for g in grads if g is not None) + captured):
                run = lambda forward: _run_forward(forward, inputs, target, additional_forward_args)  # noqa: E731
                where = locate_non_finite(gm, assignments, run, inputs, captures)
                raise NonFiniteError(f"the relevance of finite inputs is not finite: {where}")
        found = dict(zip(map(id, floating), grads))
        grads = tuple(torch.zeros_like(x) if found.get(id(x)) is None else found[id(x)] for x in inputs)
        return outputs.detach(), grads


def _no_relevance_path(model: nn.Module, inputs: Tuple[Tensor, ...], assignments: List[RuleAssignment]) -> ValueError:
    """The error for a target output that no relevance path links to an input or an embedding lookup."""
    name = type(model).__name__
    if not any(x.is_floating_point() for x in inputs):
        kinds = ", ".join(sorted({str(x.dtype) for x in inputs}))
        return ValueError(
            f"LRP on {name}: no input is floating point ({kinds}) and no embedding lookup reads one, so "
            "nothing can carry relevance; pass floating-point inputs (for token ids: the embeddings, as "
            "inputs of the rest of the model)"
        )
    constants = [a.qualname for a in assignments if isinstance(a.rule, ConstantRule)]
    where = f" The nodes LRP holds constant: {', '.join(constants)}." if constants else ""
    return ValueError(
        f"LRP on {name}: no relevance path leads from the target output to the inputs: it is computed "
        f"through operations whose output LRP holds constant (a softmax at the output) or does not "
        f"depend on the inputs.{where} Explain the logits: the model without its final softmax."
    )


def _check_floating(inputs: Tuple[Tensor, ...]) -> None:
    for i, x in enumerate(inputs):
        if not x.is_floating_point():
            raise TypeError(
                f"LRP attributes relevance to floating-point inputs, but input {i} is {x.dtype} "
                "(token ids?). Read relevance at the embedding's output instead: "
                "LayerLRP(model, model.get_input_embeddings()).attribute(input_ids, ...) summed over "
                "the last dimension gives one value per token; or explain a wrapper that calls the "
                "model with inputs_embeds=."
            )


class LRP(_GraphLRPMixin, _CaptumLRP):
    r"""Captum's LRP on any model: functional operations get rules too.

    Accepts every argument of :class:`captum.attr.LRP` with the same meaning and
    return shapes. The model is traced with torch.fx and rewritten (additions,
    concatenations, functional activations and poolings become modules; shared
    and in-place modules are made safe) before relevance is propagated in one
    forward and one backward pass. The graph is captured with ``torch.export`` at
    each call's own inputs and cached per input signature. The model itself is
    never modified.

    Args:
        model: the model, as it is.
        rules: optional overrides, keyed by qualified name (``"layer1"`` covers
            everything inside ``layer1``) or by module type. A ``rule``
            attribute set on a module of the model (Captum's way) is honoured.
        preset: ``"epsilon"`` (default, Captum's rules) or one of zennit's
            composites: ``"epsilon-plus"``, ``"epsilon-plus-flat"``,
            ``"epsilon-alpha2-beta1"``, ``"epsilon-alpha2-beta1-flat"``,
            ``"epsilon-gamma-box"`` (input bounds [-3, 3]; other bounds:
            ``preset=captum_graph.rules.epsilon_gamma_box(low, high)``); for
            transformers ``"cp-lrp"`` or ``"attn-lrp"``; or a
            :class:`~captum_graph.rules.Preset`. README: "Choosing a preset".
        fold_batch_norm: merge each eval-mode batch norm into the convolution
            or linear layer feeding it before propagating (zennit's canonizer,
            anywhere in the graph). ``None`` (default): on for every preset
            but ``"epsilon"`` (their rules are defined for the merged layers,
            as zennit's composites need its canonizers), off otherwise.

    Examples::

        >>> from captum_graph.attr import LRP
        >>> lrp = LRP(torchvision.models.resnet18().eval())
        >>> relevance = lrp.attribute(images, target=3)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        rules: Optional[Mapping[RuleKey, PropagationRule]] = None,
        preset: Union[str, Preset, None] = None,
        fold_batch_norm: Optional[bool] = None,
    ) -> None:
        _CaptumLRP.__init__(self, model)
        self._init_rules(rules, preset, fold_batch_norm)

    @typing.overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        *,
        return_convergence_delta: Literal[True],
        verbose: bool = False,
    ) -> Tuple[TensorOrTupleOfTensorsGeneric, Tensor]: ...

    @typing.overload
    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        return_convergence_delta: Literal[False] = False,
        verbose: bool = False,
    ) -> TensorOrTupleOfTensorsGeneric: ...

    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        return_convergence_delta: bool = False,
        verbose: bool = False,
    ) -> Union[TensorOrTupleOfTensorsGeneric, Tuple[TensorOrTupleOfTensorsGeneric, Tensor]]:
        """Relevance of each input feature; see :meth:`captum.attr.LRP.attribute`.

        Unlike Captum's (whose docstring says otherwise but whose code scales),
        relevance sums to the target output, as here too. Inputs must be
        floating point: for token ids, use :class:`LayerLRP` at the embedding.
        """
        self.verbose = verbose
        is_tuple = _is_tuple(inputs)
        input_tuple = _format_tensor_into_tuples(inputs)
        _check_floating(input_tuple)
        output, relevances = self._relevance_pass(input_tuple, target, additional_forward_args, verbose)
        formatted = _format_output(is_tuple, relevances)
        if return_convergence_delta:
            return formatted, self.compute_convergence_delta(relevances, output)
        return formatted


class LayerLRP(_GraphLRPMixin, _CaptumLayerLRP):
    r"""Captum's LayerLRP on any model; ``layer`` may also be a name.

    ``layer`` is a module, a module's qualified name (``"layer4"``), a node's
    qualified name (``"layer1.0.add"``: a functional addition) or fx name
    (``"add_7"``), or a list of these. With ``attribute_to_layer_input=True``
    the relevance of each input of the layer is returned separately, e.g. the
    skip connection's and the residual branch's at an addition. With token
    ids as inputs, the embedding layer (``model.get_input_embeddings()``)
    gives relevance per token and hidden unit: relevance starts at the rows an
    embedding looks up. A layer that no relevance reaches gets zeros.

    Args:
        model: the model, as it is.
        layer: see above.
        rules, preset, fold_batch_norm: as in :class:`LRP`.
    """

    def __init__(
        self,
        model: nn.Module,
        layer: Union[LayerSpec, List[LayerSpec]],
        *,
        rules: Optional[Mapping[RuleKey, PropagationRule]] = None,
        preset: Union[str, Preset, None] = None,
        fold_batch_norm: Optional[bool] = None,
    ) -> None:
        _CaptumLayerLRP.__init__(self, model, layer)
        self._init_rules(rules, preset, fold_batch_norm)
        for spec in self._layer_list():
            check_layer_spec(model, spec)  # resolved on the graph captured at the call

    def _layer_list(self) -> List[LayerSpec]:
        return list(self.layer) if isinstance(self.layer, list) else [self.layer]

    def attribute(
        self,
        inputs: TensorOrTupleOfTensorsGeneric,
        target: TargetType = None,
        additional_forward_args: Optional[object] = None,
        return_convergence_delta: bool = False,
        attribute_to_layer_input: bool = False,
        verbose: bool = False,
    ):
        """Relevance at the layer's output (or inputs); see :meth:`captum.attr.LayerLRP.attribute`."""
        self.verbose = verbose
        self.attribute_to_layer_input = attribute_to_layer_input
        prepared = self.prepared(inputs, additional_forward_args)
        nodes = [resolve_layer(self.model, prepared, spec) for spec in self._layer_list()]
        captures = [LayerCapture(str(node.target), attribute_to_layer_input) for node in nodes]
        for node in nodes:
            if node.op != "call_module":
                raise ValueError(
                    f"layer '{node.meta.get('qualname', node.name)}' is a {node.op} node; LayerLRP needs a "
                    "module or a functional operation that captum_graph turns into a module"
                )
        input_tuple = _format_tensor_into_tuples(inputs)
        output, _ = self._relevance_pass(input_tuple, target, additional_forward_args, verbose, captures, prepared)
        relevances = [self._layer_relevance(capture) for capture in captures]
        result = relevances if isinstance(self.layer, list) else relevances[0]
        if not return_convergence_delta:
            return result
        if isinstance(self.layer, list):
            return result, [self.compute_convergence_delta(r, output) for r in relevances]
        return result, self.compute_convergence_delta(result, output)

    def _layer_relevance(self, capture: LayerCapture) -> Union[Tensor, Tuple[Tensor, ...]]:
        found = tuple(capture.relevance[i] for i in sorted(capture.relevance))
        if not found and capture.output_like is not None:  # it only feeds what LRP holds constant
            shape, dtype, device = capture.output_like
            return torch.zeros(shape, dtype=dtype, device=device)
        if not found:
            raise RuntimeError(f"no relevance reached layer '{capture.node_target}' for this target")
        return found[0] if len(found) == 1 else found
