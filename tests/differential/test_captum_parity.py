"""captum_graph.attr against captum.attr on every model of ``captum.testing.helpers.basic_models``.

Captum ships its own test models in the wheel; each is listed in ``RECIPES``
(how to build it, its inputs, the ``additional_forward_args`` it takes, the
modules a layer method can hook, how its LRP is checked) or in ``EXCLUDED``
with the reason. A model class added to Captum fails
:func:`test_every_basic_model_is_covered` until it is listed.

What is compared:

* **Layer methods with modules** (LayerActivation, LayerGradCam,
  LayerGradientXActivation, LayerIntegratedGradients, LayerConductance,
  LayerDeepLift, GuidedGradCam): bit for bit (``torch.equal``), over the
  argument forms Captum accepts (:func:`_layer_forms`, one option at a time,
  and combinations drawn by hypothesis); where Captum raises, captum_graph
  raises the same exception type. The model's state is checked before and
  after each captum_graph call (returning or raising); a model Captum may
  have left hooks on (it raised) is built again.
* **The same on the graph** (``_attribute_on_graph``, the path a node name or
  the automatic layer takes), for modules called once: bit for bit as well.
* **LRP and LayerLRP**: to 1e-10 in float64 where Captum's answer is right;
  where it is not, or Captum refuses, the oracle named in the recipe.
* **Limitations of Captum that stay lifted**: activations without a Captum
  rule, a module called twice, tensors among ``additional_forward_args``.
"""
import copy
import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from captum import attr as captum_attr
from captum._utils.common import _run_forward, _select_targets
from captum.testing.helpers import basic_models as bm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from captum_graph import attr as graph_attr
from helpers.oracles import NEGLIGIBLE_EPSILON, assert_conserves, assert_same_snapshot, input_x_gradient, snapshot

pytestmark = pytest.mark.filterwarnings("ignore")

D = torch.float64


def _r(*shape: int) -> Tensor:
    return torch.randn(*shape, dtype=D)


def _ids(*shape: int) -> Tensor:
    return torch.randint(0, 10, shape)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to run one basic model.

    Attributes:
        build: the model (converted to ``dtype``, eval mode).
        inputs: Captum's ``inputs``.
        layers: module names Captum hooks; ``""`` is the model itself.
        extras: ``additional_forward_args`` variants; ``None``: not passed
            (the forward's defaults hold).
        lrp: how LRP is checked: ``"captum"`` (equal to Captum's, which is
            right here), ``"ixg"`` (oracle 1: LRP with negligible epsilon
            equals Gradient x Input), ``"hand"`` (the default rules written
            out), ``"refused"`` (captum_graph raises, as Captum does),
            ``"none"`` (not checked, see ``why``).
        why: why Captum's LRP is not the reference (for the other modes).
        dtype: the model's dtype.
        graph: why the graph path is not compared (``""``: it is).
        wrong_with: indices of ``extras`` with which Captum's LRP is wrong
            (they add a functional operation): checked by oracle 1 instead.
    """

    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    layers: Tuple[str, ...]
    extras: Tuple[Optional[Callable[[], Any]], ...] = (None,)
    lrp: str = "captum"
    why: str = ""
    dtype: torch.dtype = D
    graph: str = ""
    wrong_with: Tuple[int, ...] = ()


_FUNCTIONAL_ONLY = "Captum sees no module: it returns Gradient x Input without applying any rule"
_FUNCTIONAL_SUM = "functional additions/subtractions are invisible to Captum, which then mis-splits relevance"
_FUTURE = "forward returns a torch.futures.Future: Captum's gradient methods raise, and torch.export cannot capture it"

RECIPES: Dict[str, Recipe] = {
    "BasicLinearReLULinear": Recipe(lambda: bm.BasicLinearReLULinear(3, bias=True), lambda: _r(3, 3), ("fc1", "relu1", "fc2")),
    "MixedKwargsAndArgsModule": Recipe(
        bm.MixedKwargsAndArgsModule, lambda: _r(3, 4), ("",), (None, lambda: (_r(3, 4),)), "ixg", _FUNCTIONAL_SUM
    ),
    "BasicModel": Recipe(bm.BasicModel, lambda: _r(3, 4), ("",), lrp="ixg", why=_FUNCTIONAL_ONLY),
    "BasicModel2": Recipe(bm.BasicModel2, lambda: (_r(3, 4), _r(3, 4)), ("",), lrp="ixg", why=_FUNCTIONAL_SUM),
    "BasicModel3": Recipe(bm.BasicModel3, lambda: (_r(3, 4), _r(3, 4)), ("",), lrp="ixg", why=_FUNCTIONAL_SUM),
    "BasicModel4_MultiArgs": Recipe(
        bm.BasicModel4_MultiArgs,
        lambda: (_r(3, 4), _r(3, 4)),
        ("",),
        (lambda: (_r(3, 4).abs() + 1,), lambda: (2.0, 3)),
        "ixg",
        _FUNCTIONAL_ONLY,
    ),
    "BasicModel5_MultiArgs": Recipe(
        bm.BasicModel5_MultiArgs, lambda: (_r(3, 4), _r(3, 4)), ("",), (lambda: ([2, 3], 1),), "ixg",
        "Captum raises TypeError on a list among additional_forward_args",
    ),
    "BasicModel6_MultiTensor": Recipe(bm.BasicModel6_MultiTensor, lambda: (_r(3, 4), _r(3, 4)), ("",), lrp="ixg", why=_FUNCTIONAL_SUM),
    "BasicLinearModel": Recipe(bm.BasicLinearModel, lambda: (_r(3, 3), _r(3, 4)), ("linear",)),
    "BasicLinearModel2": Recipe(lambda: bm.BasicLinearModel2(3, 4), lambda: _r(3, 3), ("linear",)),
    "BasicLinearModel_Multilayer": Recipe(lambda: bm.BasicLinearModel_Multilayer(3, 5, 4), lambda: _r(3, 3), ("linear1", "linear2")),
    "ReLUDeepLiftModel": Recipe(
        bm.ReLUDeepLiftModel, lambda: (_r(3, 4), _r(3, 4)), ("relu1", "relu2"), (None, lambda: (3,)), "ixg", _FUNCTIONAL_SUM
    ),
    "LinearMaxPoolLinearModel": Recipe(bm.LinearMaxPoolLinearModel, lambda: _r(3, 4), ("lin1", "pool1", "lin2")),
    "BasicModelWithReusedModules": Recipe(bm.BasicModelWithReusedModules, lambda: _r(3, 3), ("lin1", "relu", "lin2")),
    "BasicModelWithReusedLinear": Recipe(
        bm.BasicModelWithReusedLinear, lambda: _r(3, 3), ("lin1", "relu"), lrp="ixg",
        why="a module called twice: Captum's LRP raises",
    ),
    "BasicModelWithSparseInputs": Recipe(
        bm.BasicModelWithSparseInputs, lambda: _r(3, 3), ("lin1",), (lambda: (torch.tensor([1.5], dtype=D),),), "refused",
        "one scalar for the whole batch: Captum and captum_graph raise IndexError (no output per example)",
    ),
    "BasicModel_MaxPool_ReLU": Recipe(
        bm.BasicModel_MaxPool_ReLU, lambda: _r(3, 2, 6), ("maxpool", "relu"), lrp="ixg", why="a functional sum over channels"
    ),
    "TanhDeepLiftModel": Recipe(
        bm.TanhDeepLiftModel, lambda: (_r(3, 4), _r(3, 4)), ("tanh1", "tanh2"), lrp="hand", why=_FUNCTIONAL_SUM
    ),
    "ReLULinearModel": Recipe(bm.ReLULinearModel, lambda: (_r(3, 3), _r(3, 3)), ("l1", "l2", "relu", "l3"), (None, lambda: (2,))),
    "SimpleLRPModel": Recipe(lambda: bm.SimpleLRPModel(False), lambda: _r(3, 3), ("linear", "relu", "linear2", "dropout")),
    "Conv1dSeqModel": Recipe(
        bm.Conv1dSeqModel, lambda: _r(3, 4, 1000), ("seq", "seq.0", "seq.1"), lrp="ixg", why="Captum has no rule for Conv1d"
    ),
    "TextModule": Recipe(
        lambda: bm.TextModule(10, 5, True), lambda: _ids(3, 6), ("inner_embedding", "inner_embedding2"),
        (None, lambda: (_ids(3, 6),)), "refused", "integer inputs carry no relevance (Captum raises TypeError)",
    ),
    "BasicEmbeddingModel": Recipe(
        lambda: bm.BasicEmbeddingModel(10, 6, 8, 2, True),
        lambda: (_ids(3, 5), _ids(3, 5)),
        ("embedding1", "embedding2", "embedding2.inner_embedding", "linear1", "relu"),
        (None, lambda: (_ids(3, 5),)),
        "refused",
        "integer inputs carry no relevance (Captum raises TypeError)",
    ),
    "PassThroughLayerOutput": Recipe(bm.PassThroughLayerOutput, lambda: _r(3, 4), ("",), lrp="ixg", why=_FUNCTIONAL_ONLY),
    "BasicModel_GradientLayerAttribution": Recipe(
        lambda: bm.BasicModel_GradientLayerAttribution(dict_output=False),
        lambda: torch.randn(3, 3),
        ("linear0", "linear1", "relu", "linear2", "linear1_alt"),
        lrp="none",
        why="its forward draws a new nn.Linear at every call: no fixed function to explain, no oracle",
        dtype=torch.float32,
        graph="its forward draws a new nn.Linear at every call; a captured graph holds one draw",
    ),
    "MultiRelu": Recipe(
        bm.MultiRelu, lambda: (_r(3, 3), _r(3, 3)), ("relu1", "relu2"), lrp="refused",
        why="returns a tuple: no target output (Captum raises AttributeError)",
    ),
    "BasicModel_MultiLayer": Recipe(
        lambda: bm.BasicModel_MultiLayer(multi_input_module=True),
        lambda: _r(3, 3),
        ("linear0", "linear1", "linear1_alt", "multi_relu", "multi_relu.relu1", "linear2"),
        (None, lambda: (_r(3, 3),), lambda: (None, True)),
        "ixg",
        _FUNCTIONAL_SUM,
    ),
    "BasicModel_MultiLayer_with_Future": Recipe(
        bm.BasicModel_MultiLayer_with_Future, lambda: _r(3, 3), ("linear1", "relu"), lrp="refused", why=_FUTURE,
        graph=_FUTURE,
    ),
    "BasicModelBoolInput": Recipe(
        bm.BasicModelBoolInput, lambda: torch.rand(3, 3) > 0.5, ("mod.linear1", "mod.relu", "mod"),
        (None, lambda: (torch.randn(3, 3), 2.0)), "refused", "boolean inputs carry no relevance (Captum asserts)",
        dtype=torch.float32,
    ),
    "BasicModelBoolInput_with_Future": Recipe(
        bm.BasicModelBoolInput_with_Future, lambda: torch.rand(3, 3) > 0.5, ("mod.linear1",), lrp="refused", why=_FUTURE,
        dtype=torch.float32, graph=_FUTURE,
    ),
    "BasicModel_MultiLayer_MultiInput": Recipe(
        bm.BasicModel_MultiLayer_MultiInput, lambda: (_r(3, 3), _r(3, 3), _r(3, 3)), ("model.linear1", "model.relu", "model"),
        (lambda: (2,),), "ixg", _FUNCTIONAL_SUM,
    ),
    "BasicModel_MultiLayer_TupleInput": Recipe(
        bm.BasicModel_MultiLayer_TupleInput, lambda: ((_r(3, 3), _r(3, 3), _r(3, 3)),), ("model.linear1", "model.relu"),
        lrp="refused", why="its one argument is a tuple of tensors: Captum's LRP asserts, captum_graph's capture refuses it",
        graph="its one argument is a tuple of tensors, which the capture refuses (positional tensors only)",
    ),
    "BasicModel_MultiLayer_MultiInput_with_Future": Recipe(
        bm.BasicModel_MultiLayer_MultiInput_with_Future, lambda: (_r(3, 3), _r(3, 3), _r(3, 3)), ("model.linear1",),
        (lambda: (2,),), "refused", _FUTURE, graph=_FUTURE,
    ),
    "BasicModel_MultiLayer_TrueMultiInput": Recipe(
        bm.BasicModel_MultiLayer_TrueMultiInput, lambda: (_r(3, 3), _r(3, 3), _r(3, 3)),
        ("m1.linear1", "m234.model.linear1", "m234", "m1.relu"), (None, lambda: (_r(3, 3),)), "ixg", _FUNCTIONAL_SUM,
    ),
    "BasicModel_ConvNet_One_Conv": Recipe(
        bm.BasicModel_ConvNet_One_Conv, lambda: 8 + 2 * _r(3, 1, 4, 4), ("conv1", "relu1", "fc1", "relu2"),
        (None, lambda: (_r(3, 1, 4, 4),)), why="x + x2 is a functional addition", wrong_with=(1,),
    ),
    "BasicModel_ConvNetWithPaddingDilation": Recipe(
        bm.BasicModel_ConvNetWithPaddingDilation, lambda: _r(3, 1, 6, 6), ("conv1", "relu1", "fc1")
    ),
    "BasicModel_ConvNet": Recipe(
        bm.BasicModel_ConvNet, lambda: _r(3, 1, 10, 10), ("conv1", "relu1", "pool1", "conv2", "fc1", "softmax"),
        lrp="refused", why="a softmax at the output: relevance is defined for logits (Captum raises TypeError)",
    ),
    "BasicModel_ConvNet_MaxPool1d": Recipe(
        bm.BasicModel_ConvNet_MaxPool1d, lambda: _r(3, 1, 10), ("conv1", "pool1", "conv2", "fc1"),
        lrp="refused", why="a softmax at the output: relevance is defined for logits (Captum raises TypeError)",
    ),
    "BasicModel_ConvNet_MaxPool3d": Recipe(
        bm.BasicModel_ConvNet_MaxPool3d, lambda: _r(3, 1, 10, 10, 10), ("conv1", "pool1", "conv2"),
        lrp="refused", why="a softmax at the output: relevance is defined for logits (Captum raises TypeError)",
    ),
}

#: Model classes of basic_models not run here, and why: none (checks a model cannot take are
#: left out per recipe: ``lrp="none"``, ``graph=...``).
EXCLUDED: Dict[str, str] = {}

LAYER_CLASSES = (
    "LayerActivation",
    "LayerGradCam",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "LayerConductance",
    "LayerDeepLift",
    "GuidedGradCam",
)
#: The layer methods Captum lets take a list of layers.
TAKES_LISTS = ("LayerActivation", "LayerGradientXActivation", "LayerIntegratedGradients")


def test_every_basic_model_is_covered():
    classes = {
        name for name, value in vars(bm).items()
        if inspect.isclass(value) and issubclass(value, nn.Module) and value.__module__ == bm.__name__
    }
    assert classes, "captum.testing.helpers.basic_models has no model classes: has it moved?"
    assert not classes - RECIPES.keys() - EXCLUDED.keys(), (
        f"new basic models: {sorted(classes - RECIPES.keys() - EXCLUDED.keys())}; add a recipe or a reasoned exclusion"
    )
    assert not (RECIPES.keys() | EXCLUDED.keys()) - classes, f"gone: {sorted((RECIPES.keys() | EXCLUDED.keys()) - classes)}"


# ---------------------------------------------------------------------------
# running both and comparing
# ---------------------------------------------------------------------------
@dataclasses.dataclass
class Form:
    """One way of calling a layer method: a label, ``__init__`` keywords, the layer, ``attribute`` keywords."""

    label: str
    layer: Any  # a module name, "" (the model itself), or a list of names
    init: Dict[str, Any]
    call: Dict[str, Any]
    by_name: bool = False  # pass the layer as its name rather than the module


def _model(recipe: Recipe) -> nn.Module:
    torch.manual_seed(0)
    return recipe.build().to(recipe.dtype).eval()


def _data(recipe: Recipe) -> Tuple[Any, List[Any]]:
    """Inputs and the additional_forward_args variants, drawn from a fixed seed."""
    torch.manual_seed(1)
    inputs = recipe.inputs()
    inputs = tuple(_cast(x, recipe.dtype) for x in inputs) if isinstance(inputs, tuple) else _cast(inputs, recipe.dtype)
    return inputs, [None if extra is None else extra() for extra in recipe.extras]


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    return value


def _as_tuple(value: Any) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _forward(model: nn.Module, inputs: Any, extra: Any) -> Any:
    _seed(2)
    with torch.no_grad():
        return model(*_as_tuple(inputs), *(_as_tuple(extra) if extra is not None else ()))


def _layer_arg(model: nn.Module, layer: Any, by_name: bool) -> Any:
    if isinstance(layer, list):
        return [_layer_arg(model, one, by_name) for one in layer]
    return layer if by_name and layer else model.get_submodule(layer)


def _seed(value: int) -> None:
    """``torch.manual_seed`` for the CPU only (seeding CUDA's generators costs milliseconds)."""
    torch.random.default_generator.manual_seed(value)


def _run(function: Callable[[], Any]) -> Any:
    """The result, or the exception raised; the global seed fixed (a basic model draws weights in forward)."""
    _seed(3)
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - compared with the other side's
        return error


def _ours(model: nn.Module, function: Callable[[], Any]) -> Any:
    """``function()`` on the user's model, which must be untouched afterwards, also where it raised."""
    before = snapshot(model)
    result = _run(function)
    assert_same_snapshot(before, snapshot(model))
    return result


def _flat(value: Any) -> List[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _flat(item)]
    raise TypeError(f"unexpected result {type(value).__name__}")


def _structure(value: Any) -> Any:
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    return (type(value).__name__, [_structure(v) for v in value])


def _assert_same(ours: Any, theirs: Any, where: str, exact: bool = True, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    if isinstance(theirs, Exception) or isinstance(ours, Exception):
        assert isinstance(theirs, Exception) and isinstance(ours, Exception), (
            f"{where}: Captum {'raised ' + repr(theirs) if isinstance(theirs, Exception) else 'returned'}, "
            f"captum_graph {'raised ' + repr(ours) if isinstance(ours, Exception) else 'returned'}"
        )
        assert isinstance(ours, type(theirs)), f"{where}: Captum raised {theirs!r}, captum_graph {ours!r}"
        return
    assert _structure(ours) == _structure(theirs), f"{where}: {_structure(ours)} != {_structure(theirs)}"
    for i, (a, b) in enumerate(zip(_flat(ours), _flat(theirs))):
        if exact:
            assert torch.equal(a, b), f"{where}: tensor {i} differs by {(a - b).abs().max().item():.3e}"
        else:
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{where}: tensor {i}: {m}")


# ---------------------------------------------------------------------------
# argument forms
# ---------------------------------------------------------------------------
def _targets(output: Any) -> List[Tuple[str, Any]]:
    """Every form of ``target`` Captum accepts for this output."""
    if not isinstance(output, Tensor) or output.dim() <= 1:
        return [("target=None", None)]
    n, k = output.shape[:2]
    rest = (0,) * (output.dim() - 2)
    forms = [("target=tuple", (1 % k,) + rest), ("target=list of tuples", [(i % k,) + rest for i in range(n)])]
    if not rest:
        forms += [
            ("target=int", 1 % k),
            ("target=tensor", torch.tensor([i % k for i in range(n)])),
            ("target=list", [i % k for i in range(n)]),
            ("target=scalar tensor", torch.tensor(k - 1)),
        ]
    return forms


def _baselines(inputs: Any) -> List[Tuple[str, Any]]:
    """Every form of ``baselines`` Captum accepts for these inputs."""
    tensors = _as_tuple(inputs)
    if not all(isinstance(x, Tensor) for x in tensors):
        return [("baselines=None", None)]
    real = all(x.is_floating_point() for x in tensors)
    scalar = 0.25 if real else 0
    like = tuple(0.1 * torch.ones_like(x) if x.is_floating_point() else torch.zeros_like(x) for x in tensors)
    forms = [("baselines=None", None), ("baselines=scalar", scalar), ("baselines=tensors", like if len(like) > 1 else like[0])]
    if real:
        forms.append(("baselines=batch of one", tuple(b[:1] for b in like) if len(like) > 1 else like[0][:1]))
    if len(like) > 1:
        forms.append(("baselines=tensor and scalar", (like[0],) + (scalar,) * (len(like) - 1)))
    return forms


def _custom_attribution(multipliers, inputs, baselines):
    return tuple(m * (i - b) * 2 for m, i, b in zip(multipliers, inputs, baselines))


def _layer_forms(name: str, recipe: Recipe, inputs: Any, output: Any) -> List[Form]:
    """One form per layer of the recipe (the plain call), then one per option, each on the next layer."""
    layers = list(recipe.layers)
    targets = _targets(output)
    plain_target = {} if name == "LayerActivation" else {"target": targets[0][1]}
    integral = {"n_steps": 4} if name in ("LayerIntegratedGradients", "LayerConductance") else {}
    forms = [
        Form(f"layer={layer!r}" + (" by name" if i % 2 and layer else ""), layer, {}, {**plain_target, **integral}, bool(i % 2))
        for i, layer in enumerate(layers)
    ]
    options: List[Tuple[str, Dict[str, Any], Dict[str, Any]]] = [("attribute_to_layer_input", {}, {"attribute_to_layer_input": True})]
    if name != "LayerActivation":
        options += [(label, {}, {"target": target}) for label, target in targets[1:]]
    if name in ("LayerGradCam", "LayerGradientXActivation", "LayerIntegratedGradients", "LayerConductance", "LayerDeepLift"):
        options.append(("grad_kwargs", {}, {"grad_kwargs": {"retain_graph": True}}))
    if name in ("LayerIntegratedGradients", "LayerConductance", "LayerDeepLift"):
        options += [(label, {}, {"baselines": b}) for label, b in _baselines(inputs)[1:]]
        options.append(("return_convergence_delta", {}, {"return_convergence_delta": True}))
    if name in ("LayerIntegratedGradients", "LayerConductance"):
        options += [
            ("n_steps=default", {}, {"n_steps": 50}),
            ("method=riemann_trapezoid", {}, {"method": "riemann_trapezoid"}),
            ("method=riemann_left, internal_batch_size", {}, {"method": "riemann_left", "internal_batch_size": 5}),
        ]
    if name in ("LayerGradientXActivation", "LayerIntegratedGradients", "LayerDeepLift"):
        options.append(("multiply_by_inputs=False", {"multiply_by_inputs": False}, {}))
    if name == "LayerDeepLift":
        options.append(("custom_attribution_func", {}, {"custom_attribution_func": _custom_attribution}))
    if name == "LayerGradCam":
        options += [
            ("relu_attributions", {}, {"relu_attributions": True}),
            ("attr_dim_summation=False", {}, {"attr_dim_summation": False}),
        ]
    if name == "GuidedGradCam":
        options.append(("interpolate_mode=area", {}, {"interpolate_mode": "area"}))
    for i, (label, init, call) in enumerate(options):
        layer = layers[(i + 1) % len(layers)]
        forms.append(Form(label, layer, init, {**plain_target, **integral, **call}, bool(i % 2)))
    if name in TAKES_LISTS and len(layers) > 1:
        forms.append(Form("a list of layers", layers[:2], {}, {**plain_target, **integral}))
        forms.append(Form("a list of layer names", layers[-2:], {}, {**plain_target, **integral}, by_name=True))
    return forms


def _cases() -> List[Tuple[str, str]]:
    return [(model, method) for model in sorted(RECIPES) for method in LAYER_CLASSES]


def _layer_method(namespace: Any, name: str, model: nn.Module, form: Form) -> Any:
    """The explainer; only captum_graph's takes layers by name."""
    by_name = form.by_name and namespace is graph_attr
    return getattr(namespace, name)(model, _layer_arg(model, form.layer, by_name), **form.init)


# ---------------------------------------------------------------------------
# layer methods given modules: Captum's own code, bit for bit
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_name, method", _cases())
def test_layer_method_on_modules_equals_captum_bit_for_bit(model_name, method):
    recipe = RECIPES[model_name]
    model = _model(recipe)
    inputs, extras = _data(recipe)
    for variant, extra in enumerate(extras):
        output = _forward(model, inputs, extra)
        forms = _layer_forms(method, recipe, inputs, output)
        for form in forms if variant == 0 else forms[: len(recipe.layers)]:
            where = f"{model_name} {method} [{form.label}, additional_forward_args #{variant}]"
            explainer = _layer_method(graph_attr, method, model, form)
            ours = _ours(model, lambda: explainer.attribute(inputs, additional_forward_args=extra, **form.call))
            theirs = _run(lambda: _layer_method(captum_attr, method, model, form).attribute(
                inputs, additional_forward_args=extra, **form.call
            ))
            if isinstance(theirs, Exception):
                model = _model(recipe)  # Captum may leave its hooks behind when it raises
            _assert_same(ours, theirs, where)
            if not isinstance(ours, Exception):
                assert explainer.layer_name == form.layer, f"{where}: layer_name {explainer.layer_name!r}"


# ---------------------------------------------------------------------------
# the same calls on the graph (the path node names and the automatic layer take)
# ---------------------------------------------------------------------------
def _called_once_leaves(model: nn.Module, inputs: Any, extra: Any) -> Tuple[set, bool]:
    """Names of the modules without children that the forward calls exactly once; whether one is called more often."""
    counts: Dict[str, int] = {}
    probe = copy.deepcopy(model)
    for name, module in probe.named_modules():
        if name and not list(module.children()):
            module.register_forward_pre_hook(lambda m, a, name=name: counts.__setitem__(name, counts.get(name, 0) + 1))
    _forward(probe, inputs, extra)
    return {name for name, count in counts.items() if count == 1}, any(count > 1 for count in counts.values())


@functools.lru_cache(maxsize=None)
def _graph_model(name: str) -> nn.Module:
    """One model per recipe, so that its graph is captured once for all methods (Captum runs on copies)."""
    return _model(RECIPES[name])


GRAPH_CASES = [(model, method) for model, method in _cases() if not RECIPES[model].graph]


@pytest.mark.parametrize("model_name, method", GRAPH_CASES)
def test_layer_method_on_the_graph_equals_captum(model_name, method):
    """Modules called once, through the graph: Captum's hooks on the graph's copy of the module."""
    recipe = RECIPES[model_name]
    model = _graph_model(model_name)
    inputs, extras = _data(recipe)
    extra = extras[0]
    leaves, reused = _called_once_leaves(model, inputs, extra)
    forms = _layer_forms(method, recipe, inputs, _forward(model, inputs, extra))
    for form in forms:
        if not set(form.layer if isinstance(form.layer, list) else [form.layer]) <= leaves:
            continue
        where = f"{model_name} {method} on the graph [{form.label}]"
        explainer = _layer_method(graph_attr, method, model, form)
        ours = _ours(model, lambda: explainer._attribute_on_graph(inputs, additional_forward_args=extra, **form.call))
        reference = copy.deepcopy(model)
        theirs = _run(lambda: _layer_method(captum_attr, method, reference, form).attribute(
            inputs, additional_forward_args=extra, **form.call
        ))
        if method == "LayerDeepLift" and reused and isinstance(theirs, Exception):
            # a limitation lifted: the graph has one module per call, where Captum's DeepLift refuses a reused one
            assert not isinstance(ours, Exception), f"{where}: {ours!r}"
            continue
        if isinstance(theirs, Exception) and isinstance(_forward(model, inputs, extra), tuple):
            # the graph returns the first tensor of a tuple output (README, "Transformers and text"), so
            # its error, if any, is about that tensor, where Captum's is about the tuple
            continue
        _assert_same(ours, theirs, where)  # the graph computes with the same ATen operators: bit for bit too


# ---------------------------------------------------------------------------
# LRP and LayerLRP: Captum's answer where it is right, else the recipe's oracle
# ---------------------------------------------------------------------------
def _lrp_input_forms(inputs: Any) -> List[Tuple[str, Any]]:
    if isinstance(inputs, Tensor):
        return [("inputs=tensor", inputs), ("inputs=tuple of one", (inputs,))]
    return [("inputs=tuple", inputs)]


def _tanh_rules_by_hand(inputs: Tuple[Tensor, Tensor], target: Any) -> Tuple[Tensor, Tensor]:
    """TanhDeepLiftModel's ``2 tanh(x1) + 2 tanh(x2 - 1.5)`` under the default rules, written out.

    Epsilon at the addition gives each term its own value; the scaling by 2
    and tanh pass relevance through; epsilon at the subtraction of 1.5 gives
    ``x2`` the share ``x2 / (x2 - 1.5)``.
    """
    x1, x2 = inputs
    mask = torch.zeros_like(x1)
    mask[torch.arange(len(x1)), torch.as_tensor(target).reshape(-1).expand(len(x1))] = 1
    return mask * 2 * torch.tanh(x1), mask * 2 * torch.tanh(x2 - 1.5) * x2 / (x2 - 1.5)


@pytest.mark.parametrize("model_name", sorted(name for name, recipe in RECIPES.items() if recipe.lrp != "none"))
def test_lrp_equals_captum_where_captum_is_right_else_the_oracle(model_name):
    recipe = RECIPES[model_name]
    model = _graph_model(model_name)
    inputs, extras = _data(recipe)
    for variant, extra in enumerate(extras):
        output = _forward(model, inputs, extra)
        for (input_label, explained), (target_label, target) in _pairs(_lrp_input_forms(inputs), _targets(output)):
            where = f"{model_name} LRP [{input_label}, {target_label}, additional_forward_args #{variant}]"
            call = dict(target=target, additional_forward_args=extra, return_convergence_delta=True)
            mode = "ixg" if variant in recipe.wrong_with else recipe.lrp
            if mode == "refused":
                ours = _ours(model, lambda: graph_attr.LRP(model).attribute(explained, **call))
                assert isinstance(ours, Exception), f"{where}: refused by Captum ({recipe.why}), not by captum_graph"
                continue
            rules = None if mode == "captum" else NEGLIGIBLE_EPSILON
            ours = _ours(model, lambda: graph_attr.LRP(model, rules=rules).attribute(explained, **call))
            assert not isinstance(ours, Exception), f"{where}: {ours!r}"
            relevance, delta = ours
            if mode == "captum":
                theirs = _run(lambda: captum_attr.LRP(copy.deepcopy(model)).attribute(explained, **call))
                _assert_same(ours, theirs, where, exact=False, rtol=1e-10, atol=1e-10)
                continue
            if mode == "ixg":
                expected = input_x_gradient(model, explained, target, extra)
            else:
                expected = _tanh_rules_by_hand(explained, target)
                expected = expected if isinstance(explained, tuple) else expected[0]
            _assert_same(relevance, expected, f"{where} against {mode} ({recipe.why})", exact=False, rtol=1e-10, atol=1e-10)
            total = sum(r.flatten(1).sum(1) for r in _as_tuple(relevance))
            selected = _select_targets(output, target)
            torch.testing.assert_close(delta, selected - total, rtol=1e-10, atol=1e-10, msg=lambda m: f"{where}: delta: {m}")


def _pairs(a: List[Any], b: List[Any]) -> List[Tuple[Any, Any]]:
    """Pairs covering every element of both lists (the shorter one cycles)."""
    return [(a[i % len(a)], b[i % len(b)]) for i in range(max(len(a), len(b)))]


def _layer_lrp_forms(recipe: Recipe, leaves: set, output: Any) -> List[Tuple[str, Any, Dict[str, Any]]]:
    layers = [layer for layer in recipe.layers if layer in leaves]
    target = _targets(output)[0][1]
    forms = [(f"layer={layer!r}", layer, {"target": target}) for layer in layers]
    forms += [(f"layer={layer!r}, attribute_to_layer_input", layer, {"target": target, "attribute_to_layer_input": True}) for layer in layers]
    if len(layers) > 1:
        forms.append(("a list of layers", layers[:2], {"target": target}))
    return forms


@pytest.mark.parametrize("model_name", sorted(name for name, recipe in RECIPES.items() if recipe.lrp not in ("refused", "none")))
def test_layer_lrp_equals_captum_where_captum_is_right_else_gradient_x_activation(model_name):
    """LayerLRP-0 relevance at a layer of a piecewise-linear network is the layer's Gradient x Activation."""
    recipe = RECIPES[model_name]
    model = _graph_model(model_name)
    inputs, extras = _data(recipe)
    extra = extras[0]
    leaves, _ = _called_once_leaves(model, inputs, extra)
    output = _forward(model, inputs, extra)
    for label, layer, call in _layer_lrp_forms(recipe, leaves, output):
        at_input = call.get("attribute_to_layer_input", False)
        if recipe.lrp == "hand" and at_input:
            continue  # tanh's input is not a cut where relevance equals Gradient x Activation
        where = f"{model_name} LayerLRP [{label}]"
        call = dict(call, additional_forward_args=extra, return_convergence_delta=True)
        layer_arg = _layer_arg(model, layer, by_name=False)
        if recipe.lrp == "captum":
            reference = copy.deepcopy(model)
            theirs = _run(lambda: captum_attr.LayerLRP(reference, _layer_arg(reference, layer, False)).attribute(inputs, **call))
            if not isinstance(theirs, Exception):  # Captum's LayerLRP raises at activations (no rule state there)
                ours = _ours(model, lambda: graph_attr.LayerLRP(model, layer_arg).attribute(inputs, **call))
                _assert_same(ours, theirs, where, exact=False, rtol=1e-10, atol=1e-10)
                continue
        ours = _ours(model, lambda: graph_attr.LayerLRP(model, layer_arg, rules=NEGLIGIBLE_EPSILON).attribute(inputs, **call))
        assert not isinstance(ours, Exception), f"{where}: {ours!r}"
        expected = _gradient_x_activation(model, layer, inputs, call["target"], extra, at_input)
        _assert_same(ours[0], expected, f"{where} against Gradient x Activation ({recipe.why or 'Captum raises'})",
                     exact=False, rtol=1e-10, atol=1e-10)


def _gradient_x_activation(model: nn.Module, layer: Any, inputs: Any, target: Any, extra: Any, at_input: bool) -> Any:
    """The layer's output (or inputs) times the target's gradient with respect to it: the LayerLRP-0 oracle.

    Captum's LayerGradientXActivation for outputs. For inputs, the gradient
    through this layer alone (LayerLRP's relevance at a layer's input is what
    enters it there), where Captum's also counts the input's other readers.
    """
    reference = copy.deepcopy(model)
    layers = _layer_arg(reference, layer, False)
    if not at_input:
        return captum_attr.LayerGradientXActivation(reference, layers).attribute(
            inputs, target=target, additional_forward_args=extra
        )
    entered: List[Tensor] = []

    def detach_inputs(module, args):
        fresh = tuple(a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        entered.extend(a for a in fresh if isinstance(a, Tensor) and a.requires_grad)
        return fresh

    handles = [one.register_forward_pre_hook(detach_inputs) for one in (layers if isinstance(layers, list) else [layers])]
    try:
        selected = _run_forward(reference, inputs, target, extra)
        grads = torch.autograd.grad(selected.sum(), entered)
    finally:
        for handle in handles:
            handle.remove()
    products = tuple(x.detach() * g for x, g in zip(entered, grads))
    return products[0] if len(products) == 1 else products


# ---------------------------------------------------------------------------
# combinations of argument forms, drawn by hypothesis
# ---------------------------------------------------------------------------
@given(data=st.data())
@settings(max_examples=40)
def test_combined_argument_forms_equal_captum_bit_for_bit(data):
    """Several options at once (the tests above vary one at a time), on modules: Captum's code, bit for bit."""
    model_name = data.draw(st.sampled_from(sorted(RECIPES)), label="model")
    method = data.draw(st.sampled_from(LAYER_CLASSES), label="method")
    recipe = RECIPES[model_name]
    model = _model(recipe)
    inputs, extras = _data(recipe)
    variant = data.draw(st.integers(0, len(extras) - 1), label="additional_forward_args")
    extra = extras[variant]
    output = _forward(model, inputs, extra)
    options = [form for form in _layer_forms(method, recipe, inputs, output)[len(recipe.layers):] if not isinstance(form.layer, list)]
    chosen = data.draw(st.lists(st.sampled_from(options), min_size=1, max_size=4, unique_by=lambda f: f.label), label="forms")
    layer = data.draw(st.sampled_from(recipe.layers), label="layer")
    by_name = data.draw(st.booleans(), label="by name")
    form = Form("+".join(f.label for f in chosen), layer, {}, {}, by_name)
    for option in chosen:
        form.init.update(option.init)
        form.call.update(option.call)
    where = f"{model_name} {method} [{form.label} at {layer!r}, additional_forward_args #{variant}]"
    explainer = _layer_method(graph_attr, method, model, form)
    ours = _ours(model, lambda: explainer.attribute(inputs, additional_forward_args=extra, **form.call))
    theirs = _run(lambda: _layer_method(captum_attr, method, model, form).attribute(
        inputs, additional_forward_args=extra, **form.call
    ))
    _assert_same(ours, theirs, where)


# ---------------------------------------------------------------------------
# limitations of Captum's LRP that stay lifted
# ---------------------------------------------------------------------------
class _ActivationsWithoutCaptumRules(nn.Module):
    """Sigmoid, ELU, SiLU and GELU as modules: Captum's LRP has no rule for any of them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.sigmoid = nn.Linear(6, 8, bias=False), nn.Sigmoid()
        self.fc2, self.elu = nn.Linear(8, 8, bias=False), nn.ELU()
        self.fc3, self.silu = nn.Linear(8, 8, bias=False), nn.SiLU()
        self.fc4, self.gelu = nn.Linear(8, 8, bias=False), nn.GELU()
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.sigmoid(self.fc1(x))
        x = self.elu(self.fc2(x))
        x = self.silu(self.fc3(x))
        return self.head(self.gelu(self.fc4(x)))


def test_activations_without_a_captum_rule_pass_relevance_through():
    """Captum's LRP raises TypeError; here they pass relevance through, so a bias-free net conserves it."""
    torch.manual_seed(0)
    model = _ActivationsWithoutCaptumRules().double().eval()
    x = torch.randn(4, 6, dtype=D)
    with pytest.raises(TypeError, match="no rule"):
        captum_attr.LRP(copy.deepcopy(model)).attribute(x, target=1)
    lrp = graph_attr.LRP(model, rules=NEGLIGIBLE_EPSILON)
    relevance, delta = _ours(model, lambda: lrp.attribute(x, target=1, return_convergence_delta=True))
    assert_conserves(relevance, model(x)[:, 1], "sigmoid, ELU, SiLU, GELU", rtol=1e-10)  # oracle 2
    torch.testing.assert_close(delta, torch.zeros_like(delta), rtol=0, atol=1e-10)
    passed = {a.qualname: a.rule_name for a in lrp.rule_report(x) if a.qualname in ("sigmoid", "elu", "silu", "gelu")}
    assert passed == dict.fromkeys(("sigmoid", "elu", "silu", "gelu"), "PassThroughRule"), passed


def test_a_module_called_twice_gets_one_rule_per_call():
    """Captum's LRP raises on BasicModelWithReusedLinear (lin1 and relu called twice); LRP-0 here is Gradient x Input."""
    recipe = RECIPES["BasicModelWithReusedLinear"]
    model = _model(recipe)
    inputs, _ = _data(recipe)
    with pytest.raises(RuntimeError):
        captum_attr.LRP(copy.deepcopy(model)).attribute(inputs, target=1)
    ours = _ours(model, lambda: graph_attr.LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(inputs, target=1))
    _assert_same(ours, input_x_gradient(model, inputs, 1), "oracle 1", exact=False, rtol=1e-10, atol=1e-12)
    # each call is a layer of its own; the module's name is ambiguous
    with pytest.raises(ValueError, match=r"called at 2 places; name the call you mean: 'lin1#0', 'lin1_1'"):
        graph_attr.LayerLRP(model, "lin1").attribute(inputs, target=1)
    for name, call in (("lin1#0", 0), ("lin1_1", 1)):
        ours = _ours(model, lambda: graph_attr.LayerLRP(model, name, rules=NEGLIGIBLE_EPSILON).attribute(inputs, target=1))
        expected = _gradient_x_call(model, model.lin1, call, inputs, 1)
        _assert_same(ours, expected, f"LayerLRP at {name}", exact=False, rtol=1e-10, atol=1e-12)


def _gradient_x_call(model: nn.Module, module: nn.Module, call: int, inputs: Tensor, target: int) -> Tensor:
    """The output of one call of ``module`` times the target's gradient with respect to it."""
    outputs: List[Tensor] = []

    def keep(m, args, output):
        outputs.append(output)

    handle = module.register_forward_hook(keep)
    try:
        selected = model(inputs)[:, target].sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(selected, outputs[call])
    return (outputs[call] * grad).detach()


class _MaskedByExtraArguments(nn.Module):
    """Products, divisions and sums with tensors passed as additional_forward_args."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor, mask: Tensor, scale: Tensor, offset: Tensor) -> Tensor:
        hidden = torch.relu(self.fc1(x * mask) / scale + offset)
        return self.fc2(hidden * mask[:, :1])


def test_lrp_holds_additional_forward_args_constant():
    """What is not explained is a constant: ``x * mask`` is a scaling of ``x``, so LRP-0 is Gradient x Input."""
    torch.manual_seed(0)
    model = _MaskedByExtraArguments().double().eval()
    x = torch.randn(4, 5, dtype=D)
    extra = ((torch.rand(4, 5, dtype=D) > 0.3).to(D), 1 + torch.rand(4, 6, dtype=D), torch.randn(4, 6, dtype=D))
    ours = _ours(model, lambda: graph_attr.LRP(model, rules=NEGLIGIBLE_EPSILON).attribute(x, target=2, additional_forward_args=extra))
    _assert_same(ours, input_x_gradient(model, x, 2, extra), "oracle 1", exact=False, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("model_name", sorted(
    name for name, recipe in RECIPES.items()
    if not recipe.graph and any(isinstance(m, nn.Conv2d) for m in _model(recipe).modules())
))
def test_automatic_gradcam_layer_equals_captum_on_the_module_it_names(model_name):
    """The automatic layer (2-D feature maps; 1-D and 3-D ones raise LayerResolutionError, asking for a layer)."""
    recipe = RECIPES[model_name]
    model = _graph_model(model_name)
    inputs, extras = _data(recipe)
    target = _targets(_forward(model, inputs, extras[0]))[0][1]
    cam = graph_attr.LayerGradCam(model)
    ours = _ours(model, lambda: cam.attribute(inputs, target=target, additional_forward_args=extras[0]))
    assert cam.layer_name in dict(model.named_modules()), f"{model_name}: automatic layer {cam.layer_name!r}"
    reference = copy.deepcopy(model)
    theirs = _run(lambda: captum_attr.LayerGradCam(reference, reference.get_submodule(cam.layer_name)).attribute(
        inputs, target=target, additional_forward_args=extras[0]
    ))
    _assert_same(ours, theirs, f"{model_name} automatic Grad-CAM at {cam.layer_name!r}", exact=False)
