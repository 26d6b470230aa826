"""Calls from several threads on one model, and the working copies that make them safe.

Every call installs its hooks and swapped forwards on a private working copy
of the prepared (or tapped) graph that it borrows for the call
(``cloning.borrowed``); the cached graph itself is only read. So any number
of threads calling ``attribute`` on one model, each with its own explainer or
all with one, get what a sequential call gives, bit for bit, and none sees
what another installs.
"""
import copy
import sys
import threading
from typing import Callable, List

import pytest
import torch
from torch import nn

import captum_graph
from captum_graph import cloning
from captum_graph.attr import GuidedGradCam, LayerConductance, LayerGradCam, LayerIntegratedGradients, LayerLRP, LRP
from captum_graph.capture import capture
from captum_graph.cloning import borrowed, private_graph_copy
from captum_graph.errors import CaptureError
from captum_graph.prepare import prepare
from captum_graph.rules import PassThroughRule
from helpers.models import TINY_MODELS, TinyNet, example_input
from helpers.oracles import assert_untouched

THREADS = 8


def _in_threads(work: Callable[[int], object], count: int = THREADS) -> List[object]:
    """``work(i)`` for ``i < count``, each in its own thread, all released at once; the results in order."""
    barrier = threading.Barrier(count)
    results: List[object] = [None] * count
    errors: List[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    if errors:
        raise errors[0]
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    return results


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def _resnet18():
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=10).double().eval()


# Each thread explains its own batch for its own target and, for LayerLRP, its own choice of
# ``attribute_to_layer_input``: a result that went to the wrong call would show.
METHODS = {
    "LRP": (lambda model: LRP(model), lambda explainer, x, i: explainer.attribute(x, target=i % 10)),
    "LayerLRP": (
        lambda model: LayerLRP(model, ["layer2", "layer3.0.add"]),
        lambda explainer, x, i: explainer.attribute(x, target=i % 10, attribute_to_layer_input=bool(i % 2)),
    ),
    "LayerGradCam": (  # a module: Captum's own code on a working copy of the model per call
        lambda model: LayerGradCam(model, "layer3"),
        lambda explainer, x, i: explainer.attribute(x, target=i % 10, relu_attributions=bool(i % 2)),
    ),
    "LayerGradCam, automatic layer": (  # the graph: a borrowed working copy of the tapped graph per call
        lambda model: LayerGradCam(model),
        lambda explainer, x, i: explainer.attribute(x, target=i % 10, relu_attributions=bool(i % 2)),
    ),
}


@pytest.fixture(scope="module")
def resnet_and_batches():
    torch.manual_seed(0)
    return _resnet18(), [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(THREADS)]


@pytest.mark.parametrize("shared", [False, True], ids=["explainer per thread", "one shared explainer"])
@pytest.mark.parametrize("method", list(METHODS))
def test_threads_get_what_sequential_calls_get(method, shared, resnet_and_batches):
    model, batches = resnet_and_batches
    make, call = METHODS[method]
    expected = [call(make(model), x, i) for i, x in enumerate(batches)]
    explainer = make(model)
    with assert_untouched(model, batches[0]):
        found = _in_threads(lambda i: call(explainer if shared else make(model), batches[i], i))
    for i in range(THREADS):
        assert _same(found[i], expected[i]), f"thread {i} got another result than a sequential call"
    assert all(not x.requires_grad for x in batches)


def test_threads_sharing_one_input_tensor(resnet_and_batches):
    """Captum marks inputs as requiring gradients for the call and unmarks them after: one thread's
    unmarking made the others' gradients fail ('One of the differentiated Tensors does not require grad')."""
    model, batches = resnet_and_batches
    x = batches[0]
    expected = LRP(model).attribute(x, target=3)
    found = _in_threads(lambda i: LRP(model).attribute(x, target=3))
    assert all(torch.equal(f, expected) for f in found)
    assert not x.requires_grad


@pytest.mark.parametrize("method", [GuidedGradCam, LayerIntegratedGradients, LayerConductance], ids=lambda c: c.__name__)
def test_other_layer_methods_in_threads_sharing_one_input_tensor(method):
    """GuidedGradCam's guided backpropagation marks its inputs as requiring gradients for the call."""
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    x = example_input()
    expected = method(model, "block").attribute(x, target=1)
    shared = method(model, "block")
    with assert_untouched(model, x):
        found = _in_threads(lambda i: (shared if i % 2 else method(model, "block")).attribute(x, target=1))
    assert all(torch.equal(f, expected) for f in found)
    assert not x.requires_grad


@pytest.mark.parametrize("method", ["LRP", "LayerGradCam"])
def test_threads_making_the_first_call_capture_once(method, monkeypatch):
    """Nothing cached yet: all threads miss the cache together; one captures, all use its graph."""
    captures = []

    def counted(*args, **kwargs):
        captures.append(1)
        return capture(*args, **kwargs)

    monkeypatch.setattr(sys.modules["captum_graph.prepare"], "capture", counted)  # the package's ``prepare`` is the function
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    batches = [example_input() for _ in range(THREADS)]
    make = {"LRP": lambda m: LRP(m), "LayerGradCam": lambda m: LayerGradCam(m)}[method]  # automatic: on the graph
    call = METHODS[method][1]
    with assert_untouched(model, batches[0]):
        found = _in_threads(lambda i: call(make(model), batches[i], i % 5))
    assert len(captures) == 1, f"{len(captures)} captures for one signature"
    assert all(_same(found[i], call(make(model), batches[i], i % 5)) for i in range(THREADS))


# ---------------------------------------------------------------------------
# nothing one call installs is visible to another
# ---------------------------------------------------------------------------
_PAUSE = {"inside": threading.Event(), "release": threading.Event()}


class Pause(nn.Module):
    """Identity; in the thread named 'paused' its forward waits until released."""

    def forward(self, x):
        if threading.current_thread().name == "paused":
            _PAUSE["inside"].set()
            _PAUSE["release"].wait(timeout=60)
        return x * 1.0  # one operation: the captured call of this leaf module


captum_graph.register_leaf_module(Pause)
_RULES = {Pause: PassThroughRule()}


def _hooks_and_swaps(gm: torch.fx.GraphModule) -> List[str]:
    found = []
    for name, module in gm.named_modules():
        hooks = [key for key, value in vars(module).items() if "hook" in key and isinstance(value, dict) and value]
        hooks = [key for key in hooks if not (module is gm and key.startswith("_forward_pre_hooks"))]  # shape check
        found += [f"{name or 'root'}.{key}" for key in hooks]
        found += [f"{name}.{attribute}" for attribute in ("forward", "fn") if attribute in vars(module) and module is not gm]
    return found


@pytest.mark.parametrize("paused_method", ["LRP", "LayerLRP", "LayerGradCam"])
def test_a_call_in_progress_leaves_nothing_for_others_to_see(paused_method):
    model = TinyNet(Pause()).double().eval()
    x = example_input()
    explainers = {
        "LRP": (LRP(model, rules=_RULES), {"target": 1}),
        "LayerLRP": (LayerLRP(model, "block", rules=_RULES), {"target": 1}),
        "LayerGradCam": (LayerGradCam(model, "block"), {"target": 1}),
    }
    expected = {name: explainer.attribute(x, **kwargs) for name, (explainer, kwargs) in explainers.items()}
    explainer, kwargs = explainers[paused_method]
    result = {}
    _PAUSE["inside"].clear()
    _PAUSE["release"].clear()
    paused = threading.Thread(name="paused", target=lambda: result.update(value=explainer.attribute(x, **kwargs)))
    paused.start()
    try:
        assert _PAUSE["inside"].wait(timeout=60), "the paused call never reached its forward"
        for graph in (prepare(model, (x,)).graph_module, prepare(model, (x,), any_batch=True).graph_module):
            assert _hooks_and_swaps(graph) == [], "the cached graph carries what a call installed"
        for name, (other, other_kwargs) in explainers.items():  # the same explainer objects, meanwhile
            assert torch.equal(other.attribute(x, **other_kwargs), expected[name]), name
    finally:
        _PAUSE["release"].set()
        paused.join(timeout=60)
    assert torch.equal(result["value"], expected[paused_method])


# ---------------------------------------------------------------------------
# working copies
# ---------------------------------------------------------------------------
def _captured():
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    x = example_input()
    return model, x, capture(model, (x,)).graph_module


def test_working_copy_owns_its_graph_and_modules():
    model, x, gm = _captured()
    owner = gm.graph.owning_module
    copy = private_graph_copy(gm)
    assert gm.graph.owning_module is owner is gm, "copying took over the template's graph"
    assert copy.graph is not gm.graph and copy.graph.owning_module is copy
    assert [(n.name, n.op, n.target) for n in copy.graph.nodes] == [(n.name, n.op, n.target) for n in gm.graph.nodes]
    for name, module in copy.named_modules():
        if name:
            assert module is not gm.get_submodule(name), name
    shared = {p.data_ptr() for p in gm.parameters()}
    assert {p.data_ptr() for p in copy.parameters()} <= shared, "parameters are copied, not shared"
    with torch.no_grad():
        assert torch.equal(copy(x), gm(x))
    with pytest.raises(CaptureError, match="shape"):  # the template's shape check came along
        copy(torch.randn(2, 3, 9, 9, dtype=torch.float64))


def test_working_copies_are_reused_in_sequence_apart_at_once_and_dropped_after_a_failure():
    _, _, gm = _captured()
    with borrowed(gm) as first:
        assert first is not gm
        with borrowed(gm) as second:  # at the same time: another copy
            assert second is not first
    with borrowed(gm) as again:
        assert again in (first, second), "a sequential call made a new copy"
    with pytest.raises(RuntimeError, match="failed"):
        with borrowed(gm) as failing:
            raise RuntimeError("failed")
    idle = cloning._IDLE[gm]
    assert failing not in idle, "a copy whose call raised was given back"
    assert len(idle) <= cloning.MAX_IDLE_COPIES


def test_sequential_calls_reuse_one_working_copy():
    model = TINY_MODELS["x + relu(conv(x))"]().double().eval()
    x = example_input()
    lrp = LRP(model)
    for target in range(3):
        lrp.attribute(x, target=target)
    assert len(cloning._IDLE[lrp.prepared(x).graph_module]) == 1


class _NormWithOwnForward(nn.BatchNorm2d):
    """A batch norm whose forward differs from its base: captured through its operations, so the graph
    reads its running statistics as attributes (held by plain container modules of the graph)."""

    def forward(self, x):
        return torch.relu(super().forward(x))


def test_a_working_copy_reads_the_values_the_model_has_now():
    """Buffers written in place after a first call (zeroed statistics, as the zoo's bias-free copies) are
    what the next call's working copy computes with: it shares them, never freezes a copy of them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _NormWithOwnForward(4), nn.Flatten(), nn.LazyLinear(5)).double().eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    model(x)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    LRP(model).attribute(x, target=1)  # a working copy of the prepared graph now waits in the pool
    with torch.no_grad():
        model[1].running_mean.zero_()
    expected = LRP(copy.deepcopy(model)).attribute(x, target=1)  # another model: captured afresh
    assert torch.equal(LRP(model).attribute(x, target=1), expected), "the working copy kept the old statistics"
