"""What repeated calls leave behind: no growing set of live tensors, no reference to
inputs or results, the prepared graph reused until the model changes, and the
faster stabiliser equal bit for bit to the formula it replaces. What one call
keeps for its backward pass: on a transformer, about what a plain backward keeps.

Nothing here is timed; ``benchmarks/run.py`` measures speed and resident memory.
"""
import copy
import gc
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torchvision
from captum.attr._utils.lrp_rules import EpsilonRule
from captum_graph.attr import LayerGradCam, LayerLRP, LRP
from captum_graph.rules import EPSILON_TYPES, ZPlusRule, stabilize
from torch import nn

from helpers.models import TINY_MODELS, example_input

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")


def _live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))  # type(): no proxies


def _residual():
    return TINY_MODELS["x + relu(conv(x))"]().double().eval()


ATTRIBUTIONS = {
    "LRP": lambda model, x: LRP(model).attribute(x, target=0),
    "LRP, explicit rules": lambda model, x: LRP(model, rules={nn.Conv2d: ZPlusRule()}).attribute(x, target=0),
    "LayerLRP at an addition": lambda model, x: LayerLRP(model, "block.add").attribute(
        x, target=0, attribute_to_layer_input=True
    ),
    "LayerGradCam": lambda model, x: LayerGradCam(model).attribute(x, target=0),
}


@pytest.mark.parametrize("method", list(ATTRIBUTIONS))
def test_repeated_calls_do_not_accumulate_tensors(method):
    model, x = _residual(), example_input()
    attribute = ATTRIBUTIONS[method]
    for _ in range(3):  # the graph is prepared and cached by the first call
        attribute(model, x)
    before = _live_tensors()
    for _ in range(20):
        attribute(model, x)
    assert _live_tensors() <= before, "live tensors grow with the number of calls"


@pytest.mark.parametrize("method", list(ATTRIBUTIONS))
def test_no_reference_to_inputs_or_results_is_kept(method):
    model = _residual()
    ATTRIBUTIONS[method](model, example_input())  # prepared and cached
    x = example_input()
    result = ATTRIBUTIONS[method](model, x)
    results = result if isinstance(result, tuple) else (result,)
    refs = [weakref.ref(x)] + [weakref.ref(r) for r in results]
    del x, result, results
    gc.collect()
    assert all(ref() is None for ref in refs), "an input or a result is still referenced after the call"


_FREED_WITH_THE_MODEL = """
import gc, sys
from torch.multiprocessing.reductions import StorageWeakRef
sys.path.insert(0, "tests"); sys.path.insert(0, "tests/unit")
from test_memory import ATTRIBUTIONS, _residual, example_input
from captum_graph.attr import LayerGradCam
ATTRIBUTIONS["LayerGradCam at a module"] = lambda model, x: LayerGradCam(model, model.block.conv).attribute(x, target=0)

def explain_a_new_model(method):
    model = _residual()
    ATTRIBUTIONS[method](model, example_input())
    return [StorageWeakRef(p.untyped_storage()) for p in model.parameters()]

for method in ATTRIBUTIONS:
    first = explain_a_new_model(method)
    for _ in range(3):  # torch refers to its latest capture (and autograd graph) for a while
        explain_a_new_model(method)
    gc.collect()
    print(method, "freed" if all(ref.expired() for ref in first) else "kept")
"""


def test_what_a_model_was_explained_with_is_freed_with_the_model():
    """Its prepared graphs, their working copies and tapped graphs, which share its parameters'
    memory, go when the model goes: a process explaining model after model (a zoo, a sweep)
    does not keep every model's weights. In a process of its own: pytest keeps what a test's
    log records refer to."""
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-c", _FREED_WITH_THE_MODEL], cwd=repo, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    kept = [line for line in done.stdout.splitlines() if not line.endswith("freed")]
    assert len(done.stdout.splitlines()) == len(ATTRIBUTIONS) + 1 and not kept, done.stdout


def test_prepared_graph_is_reused_by_later_calls_and_other_instances():
    model, x = _residual(), example_input()
    lrp = LRP(model)
    first = lrp.prepared(x)
    lrp.attribute(x, target=0)
    LayerLRP(model, "block.add").attribute(x, target=0)
    assert lrp.prepared(x) is first
    assert LRP(model).prepared(x) is first
    assert lrp.prepared(torch.cat([x, x, x])) is first, "a dynamic batch dimension: no capture for another batch size"


_IN_PLACE = lambda model: model.block.conv.weight.mul_(2.0)  # noqa: E731 - under no_grad: an optimiser step


@pytest.mark.parametrize(
    "change, fold_batch_norm, rebuilt",
    [
        (_IN_PLACE, False, False),  # the graph shares the storage: it sees the new values
        (_IN_PLACE, True, True),  # folded batch norms bake values in
        (lambda model: setattr(model.block.conv.weight, "data", model.block.conv.weight.data * 2), False, True),
        (lambda model: setattr(model.block.conv, "weight", nn.Parameter(model.block.conv.weight * 2)), False, True),
    ],
    ids=["in place", "in place, folded", "data rebound", "parameter replaced"],
)
def test_prepared_graph_follows_parameter_changes(change, fold_batch_norm, rebuilt):
    model, x = _residual(), example_input()
    lrp = LRP(model, fold_batch_norm=fold_batch_norm)
    first = lrp.prepared(x)
    before = lrp.attribute(x, target=0)
    with torch.no_grad():
        change(model)
    assert (lrp.prepared(x) is not first) == rebuilt
    after = lrp.attribute(x, target=0)
    reference = LRP(copy.deepcopy(model), fold_batch_norm=fold_batch_norm).attribute(x, target=0)  # never prepared
    torch.testing.assert_close(after, reference, rtol=0, atol=0)
    assert not torch.equal(after, before)


def test_stabilize_equals_the_spelled_out_formula_bit_for_bit():
    def spelled_out(z, epsilon):
        sign = (z >= 0).to(z.dtype) * 2 - 1
        return z + epsilon * sign

    for dtype, bits in [(torch.float64, torch.int64), (torch.float32, torch.int32), (torch.bfloat16, torch.int16)]:
        z = torch.randn(5000, dtype=torch.float64) * torch.logspace(-14, 3, 5000, dtype=torch.float64)
        z[:4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")], dtype=torch.float64)
        z = z.to(dtype)
        for epsilon in (1e-9, 1e-6, 0.25, 0.0):
            for requires_grad in (False, True):
                value = z.clone().requires_grad_(requires_grad)
                expected, found = spelled_out(value, epsilon).detach(), stabilize(value, epsilon).detach()
                assert torch.equal(expected.view(bits), found.view(bits)), (dtype, epsilon, requires_grad)
            relu_output = torch.relu(z)
            relu_output[1] = -0.0  # relu may give -0.0, which counts as positive
            expected = spelled_out(relu_output, epsilon)
            assert torch.equal(expected.view(bits), stabilize(relu_output, epsilon, non_negative=True).view(bits))
    nan = stabilize(torch.tensor([float("nan")]), 1e-9)
    assert nan.isnan().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("non_negative", [False, True], ids=["signed", "relu-output"])
def test_ratio_in_the_values_own_memory_is_the_quotient(dtype, non_negative):
    """``grad / stab(v) * v`` computed in ``v``'s memory: exact at 0 and for large ``|v|``, a few ulps elsewhere."""
    from captum_graph.fusion import _ratio_times_value

    torch.manual_seed(0)
    value = torch.randn(4000, dtype=torch.float64) * torch.logspace(-14, 9, 4000, dtype=torch.float64)
    value[:3] = torch.tensor([0.0, -0.0, 1e-9])
    value = (value.abs() if non_negative else value).to(dtype)
    grad = torch.randn(4000, dtype=dtype)
    epsilon = 1e-9
    exact = (grad.double() / stabilize(value.double(), epsilon) * value.double()).to(dtype)
    owned = value.clone()
    found = _ratio_times_value(grad, owned, epsilon, non_negative, reuse=True)
    assert found.data_ptr() == owned.data_ptr(), "the result did not take the value's memory"
    assert (found[:2] == 0).all() and (found[2] - grad[2] / 2).abs() <= 1e-6 * grad[2].abs()
    large = value.abs() > 2 * epsilon / torch.finfo(dtype).eps  # eps / |v| below half an ulp of 1
    assert large.sum() > 100 and torch.equal(found[large], grad[large])
    torch.testing.assert_close(found, exact, rtol=4 * torch.finfo(dtype).eps, atol=0)
    fresh = _ratio_times_value(grad, value, epsilon, non_negative, reuse=False)
    assert fresh.data_ptr() != value.data_ptr()
    torch.testing.assert_close(fresh, exact, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    """torchvision's ViT, small: its attention packs q, k, v in one projection and copies them apart.
    Shared by the tests below, so that it is captured once."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=128, num_classes=5
    )
    with torch.no_grad():
        model.heads.head.weight.normal_(0, 0.1)  # torchvision initialises it to zero
    return model.double().eval()


def _saved_bytes(model: nn.Module, call) -> int:
    """Bytes of the distinct storages that autograd keeps for the backward pass of ``call()`` when that
    pass starts, the model's parameters and buffers left out (every method shares them)."""
    saved, kept = [], {}

    def pack(tensor):
        detached = tensor.detach()  # not the tensor itself: that would tie it to its own node in a cycle
        saved.append(weakref.ref(detached))
        return detached

    def unpack(tensor):
        if not kept:  # the first step of the backward pass: what the forward left behind
            for ref in saved:
                alive = ref()
                if alive is not None:
                    kept[alive.untyped_storage().data_ptr()] = alive.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        call()
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    return sum(size for address, size in kept.items() if address not in weights)


def test_lrp_keeps_about_what_a_plain_backward_keeps_on_a_transformer(tiny_vit):
    """Kept for the backward pass: LRP at most 1.12 times what a plain backward keeps.

    1.29 times when every epsilon layer kept its output for its ratio; 1.14 with
    the ratio of a copied value taken on the copy; 1.09 with the residual sums
    recomputed from their terms.
    """
    model = tiny_vit
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    lrp = LRP(model)
    lrp.attribute(x, target=1)  # captured and prepared: only the call itself is measured

    def plain_backward():
        leaf = x.clone().requires_grad_()
        torch.autograd.grad(model(leaf)[:, 1].sum(), leaf)

    plain = _saved_bytes(model, plain_backward)
    ours = _saved_bytes(model, lambda: lrp.attribute(x, target=1))
    assert ours <= 1.12 * plain, f"LRP keeps {ours / plain:.2f} times what a plain backward keeps"


def test_ratio_of_a_copied_value_is_taken_on_the_copy_and_sums_are_recomputed(tiny_vit):
    """The in-projection's packed output is copied apart into q, k, v: the attention takes the
    projection's ratio on its values (the copy it keeps), the projection keeps nothing. An addition
    whose terms are kept anyway recomputes its sum. The relevance is the plain engine's, with an
    epsilon large enough that a ratio at the wrong tensor would show."""
    from captum_graph import engine
    from captum_graph.fusion import FusedRatios, fused_ratios
    from captum_graph.prepare import prepare

    model = tiny_vit
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    rules = {EPSILON_TYPES: EpsilonRule(0.5)}
    lrp = LRP(model, rules=rules)
    gm = prepare(model, (x,)).graph_module
    by_name = {a.qualname: a.rule for a in lrp.rule_report(x) if a.rule is not None}
    assigned = {n.target: by_name[n.meta.get("qualname", n.name)] for n in gm.graph.find_nodes(op="call_module")
                if n.meta.get("qualname", n.name) in by_name}
    plan = fused_ratios(gm, assigned, set())
    for layer in range(2):
        block = f"encoder.layers.encoder_layer_{layer}.self_attention"
        assert f"{block}.linear" in plan.after_copy and f"{block}.linear" not in plan.at_output
        # only the values take it (queries and keys are constants), in the copy's memory
        assert plan.at_inputs[f"{block}.scaled_dot_product_attention"] == {2: (0.5, True)}
        # the attention's residual sum: both terms (the block's input, the projection's output) are kept
        assert plan.recomputed_sums == {f"encoder.layers.encoder_layer_{i}.add": 0.5 for i in range(2)}

    found = lrp.attribute(x, target=[1, 3])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "fused_ratios", lambda *args: FusedRatios())
        unfused = lrp.attribute(x, target=[1, 3])
    torch.testing.assert_close(found, unfused, rtol=1e-10, atol=1e-12)
    assert torch.equal(found, lrp.attribute(x, target=[1, 3])), "the copy's memory was not put back to use cleanly"


class _ActivationNet(nn.Module):
    """Linear -> GELU -> Linear and conv -> batch norm -> SiLU -> conv: activations between epsilon layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.norm, self.conv2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)
        self.fc1, self.fc2 = nn.Linear(4 * 8 * 8, 16), nn.Linear(16, 5)

    def forward(self, x):
        x = self.conv2(nn.functional.silu(self.norm(self.conv1(x))))
        return self.fc2(nn.functional.gelu(self.fc1(x.flatten(1))))


def test_an_activation_between_epsilon_layers_takes_the_ratio_in_one_step():
    """GELU and SiLU (not ReLUs): the layer before leaves its ratio to the activation, its readers their
    multiplication; the relevance is the plain engine's, with an epsilon large enough to show a mistake."""
    from captum_graph import engine
    from captum_graph.fusion import FusedRatios, fused_ratios
    from captum_graph.prepare import prepare

    torch.manual_seed(0)
    model = _ActivationNet().double().eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    lrp = LRP(model, rules={EPSILON_TYPES: EpsilonRule(0.5)})
    gm = prepare(model, (x,)).graph_module
    by_name = {a.qualname: a.rule for a in lrp.rule_report(x) if a.rule is not None}
    assigned = {n.target: by_name[n.meta.get("qualname", n.name)] for n in gm.graph.find_nodes(op="call_module")
                if n.meta.get("qualname", n.name) in by_name}
    plan = fused_ratios(gm, assigned, set())
    assert plan.before_activation == {"norm", "fc1"} and len(plan.activations) == 2
    assert {"conv2", "fc2"} <= set(plan.ratio_args), "the readers still multiply by the activation's output"

    found = lrp.attribute(x, target=[1, 3])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(engine, "fused_ratios", lambda *args: FusedRatios())
        unfused = lrp.attribute(x, target=[1, 3])
    torch.testing.assert_close(found, unfused, rtol=1e-10, atol=1e-12)


def test_a_transposed_input_of_a_linear_layer_runs_as_one_matrix_product():
    """Attention's in-projection reads a sequence-first view; ``aten.linear`` on it would run a
    batched product with the weight repeated per position (twice as slow on CPUs): LRP hands
    the layer a contiguous copy, and relevance stays Gradient x Input (oracle 1)."""
    from helpers.oracles import input_x_gradient, negligible_epsilon
    from torch.profiler import profile

    class SequenceFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 4)

        def forward(self, x):
            return torch.nn.functional.linear(x.transpose(0, 1), self.proj.weight).relu().sum((0, 2)).unsqueeze(1)

    model = SequenceFirst().double().eval()
    x = torch.randn(3, 5, 6, dtype=torch.float64)
    lrp = LRP(model, rules=negligible_epsilon())
    lrp.attribute(x, target=0)  # prepared
    with profile() as trace:
        relevance = lrp.attribute(x, target=0)
    products = {event.key for event in trace.key_averages()} & {"aten::bmm", "aten::addmm", "aten::mm"}
    assert "aten::bmm" not in products, products
    torch.testing.assert_close(relevance, input_x_gradient(model, x, 0))
