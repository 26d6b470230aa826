"""Rules for normalisation, gates, products and attention, against their formulas (float64)."""
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from captum_graph.attr import LRP
from captum_graph.linearized import group_norm, layer_norm
from captum_graph.passes import fold_batch_norms
from captum_graph.report import branch_relevance, model_report
from captum.attr._utils.lrp_rules import EpsilonRule

from captum_graph.modules import Product as UniformSplit
from captum_graph.rules import EPSILON_TYPES, UniformSplitRule
from captum_graph.cloning import private_copy
from helpers.oracles import assert_untouched as untouched

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")
DTYPE = torch.float64


#: epsilon negligible everywhere, so the formulas below hold exactly
TINY = {EPSILON_TYPES: EpsilonRule(1e-15), UniformSplit: UniformSplitRule(1e-15)}


def _relevance(model: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
    return LRP(model, rules=TINY).attribute(x, target=target)


def test_linearised_norms_compute_the_same_values():
    x = torch.randn(2, 6, 5, 5, dtype=DTYPE)
    w, b = torch.randn(5, dtype=DTYPE), torch.randn(5, dtype=DTYPE)
    torch.testing.assert_close(layer_norm(x, (5,), w, b, 1e-5), F.layer_norm(x, (5,), w, b, 1e-5))
    gw, gb = torch.randn(6, dtype=DTYPE), torch.randn(6, dtype=DTYPE)
    torch.testing.assert_close(group_norm(x, 3, gw, gb, 1e-5), F.group_norm(x, 3, gw, gb, 1e-5))


class _Norm(nn.Module):
    def __init__(self, norm: nn.Module, features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(4, features, bias=False)
        self.norm = norm
        self.head = nn.Linear(features, 3, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.fc(x)))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_norm_rule_treats_the_standard_deviation_as_a_constant(norm):
    torch.manual_seed(0)
    layer = nn.LayerNorm(6, bias=False) if norm == "layer" else nn.GroupNorm(2, 6, affine=False)
    model = _Norm(layer, 6).to(DTYPE).eval()
    if norm == "layer":
        with torch.no_grad():
            layer.weight.normal_()
    x = torch.randn(3, 4, dtype=DTYPE)
    relevance = _relevance(model, x, target=1)
    # by hand, per group of n features: y = w (h - mean h) / s with s constant, so
    # J^T v = (w v - mean(w v)) / s and R_h = h J^T (R_y / y)
    groups = 1 if norm == "layer" else 2
    weight = layer.weight.detach() if norm == "layer" else torch.ones(6, dtype=DTYPE)
    h = model.fc(x).detach()
    y = model.norm(h).detach()
    out = model.head(y)[:, 1]
    r_y = y * model.head.weight[1].detach()
    wv = (weight * r_y / y).reshape(3, groups, -1)
    std = (h.reshape(3, groups, -1).var(-1, unbiased=False, keepdim=True) + layer.eps).sqrt()
    r_h = h * ((wv - wv.mean(-1, keepdim=True)) / std).reshape(3, 6)
    expected = x * ((r_h / h) @ model.fc.weight.detach())
    torch.testing.assert_close(relevance, expected, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(relevance.sum(1), out.detach(), rtol=1e-6, atol=1e-9)


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 5, bias=False)
        self.gate = nn.Linear(4, 5, bias=False)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        return self.head(self.fc(x) * torch.sigmoid(self.gate(x)))


def test_gate_is_a_constant_and_all_relevance_goes_to_the_signal():
    torch.manual_seed(0)
    model = _Gated().to(DTYPE).eval()
    x = torch.randn(3, 4, dtype=DTYPE)
    relevance = _relevance(model, x, target=0)
    g = torch.sigmoid(model.gate(x)).detach()
    s = model.fc(x).detach()
    out = model(x)[:, 0].detach()
    r_s = s * g * model.head.weight[0]  # relevance of the gated signal (epsilon rule, exact)
    expected = x * (model.fc.weight.T @ (r_s / s).T).T
    torch.testing.assert_close(relevance, expected, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(relevance.sum(1), out, rtol=1e-7, atol=1e-10)
    kinds = {a.qualname: a.module_type for a in LRP(model).rule_report()}
    assert kinds["mul"] == "Gate"


class _Bilinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5, bias=False)
        self.b = nn.Linear(4, 5, bias=False)
        self.head = nn.Linear(5, 2, bias=False)

    def forward(self, x):
        return self.head(self.a(x) * torch.relu(self.b(x)))


def test_product_of_two_signals_splits_relevance_in_half_and_the_report_warns():
    torch.manual_seed(0)
    model = _Bilinear().to(DTYPE).eval()
    x = torch.randn(3, 4, dtype=DTYPE)
    lrp = LRP(model, rules=TINY)
    relevance = lrp.attribute(x, target=1)
    a, b = model.a(x).detach(), torch.relu(model.b(x)).detach()
    r_z = a * b * model.head.weight[1]
    r_a, r_b = r_z / 2, r_z / 2
    pre_b = model.b(x).detach()
    expected = x * (model.a.weight.T @ torch.nan_to_num(r_a / a).T).T + x * (
        model.b.weight.T @ torch.nan_to_num(r_b / pre_b).T
    ).T
    torch.testing.assert_close(relevance, expected, rtol=1e-6, atol=1e-9)
    assert isinstance({r.qualname: r for r in lrp.rule_report()}["mul"].rule, UniformSplitRule)
    warnings = model_report(model)["warnings"]
    assert len(warnings) == 1 and "mul" in warnings[0] and "split in half" in warnings[0]


def test_multihead_attention_keeps_its_values_and_conserves():
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(8, 2, batch_first=True, bias=False).to(DTYPE).eval()

    class Attend(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = attention
            self.head = nn.Linear(8, 3, bias=False)

        def forward(self, x):
            return self.head(self.attn(x, x, x, need_weights=False)[0].mean(1))

    model = Attend().to(DTYPE).eval()
    x = torch.randn(2, 5, 8, dtype=DTYPE)
    with untouched(model, x):
        relevance = _relevance(model, x, target=2)
    torch.testing.assert_close(relevance.flatten(1).sum(1), model(x)[:, 2].detach(), rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize(
    "options",
    [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": "bool"}, {"mask": "float"}, {"enable_gqa": True}],
    ids=["plain", "causal", "scale", "bool mask", "additive mask", "grouped queries"],
)
def test_linearised_attention_equals_sdpa_and_holds_probabilities_constant(options):
    from captum_graph.linearized import attention

    heads_kv = 1 if options.get("enable_gqa") else 2
    q = torch.randn(2, 2, 5, 4, dtype=DTYPE, requires_grad=True)
    k = torch.randn(2, heads_kv, 5, 4, dtype=DTYPE, requires_grad=True)
    v = torch.randn(2, heads_kv, 5, 4, dtype=DTYPE, requires_grad=True)
    kwargs = {key: value for key, value in options.items() if key != "mask"}
    if options.get("mask") == "bool":
        kwargs["attn_mask"] = torch.rand(5, 5) > 0.3
        kwargs["attn_mask"][:, 0] = True  # every query sees some key
    elif options.get("mask") == "float":
        kwargs["attn_mask"] = torch.randn(5, 5, dtype=DTYPE)
    out = attention(q, k, v, **kwargs)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, **kwargs), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert grads[0] is None and grads[1] is None, "the probabilities must be constants"
    assert grads[2] is not None and grads[2].abs().sum() > 0


def _rewritten(model: nn.Module, x: torch.Tensor):
    """A fresh rewritten graph (prepare's is cached and shared: passes below may change this one)."""
    from captum_graph.capture import capture
    from captum_graph.prepare import rewrite_passes

    copy = private_copy(model)
    gm = capture(copy, (x,)).graph_module
    for run_pass in rewrite_passes(copy):
        run_pass(gm)
    return gm


def test_fold_batch_norms_keeps_outputs_and_is_idempotent():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(DTYPE).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    with untouched(model, x):
        gm = _rewritten(model, x)
        assert fold_batch_norms(gm)
        assert not any(isinstance(gm.get_submodule(n.target), nn.BatchNorm2d) for n in gm.graph.find_nodes(op="call_module"))
        gm.graph.lint()
        torch.testing.assert_close(gm(x), model(x), rtol=1e-10, atol=1e-10)
        assert not fold_batch_norms(gm)
        folded = LRP(model, fold_batch_norm=True).attribute(x, target=1)
    # folding changes where epsilon acts, not what LRP-0 computes: both equal Gradient x Input
    unfolded = LRP(model, rules=TINY).attribute(x, target=1)
    folded_tiny = LRP(model, rules=TINY, fold_batch_norm=True).attribute(x, target=1)
    torch.testing.assert_close(folded_tiny, unfolded, rtol=1e-6, atol=1e-12)
    assert torch.isfinite(folded).all()


def test_batch_norm_in_training_mode_is_not_folded():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    gm = _rewritten(model, torch.randn(2, 3, 8, 8))
    assert not fold_batch_norms(gm)


def test_branch_relevance_splits_each_residual_addition():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(DTYPE).eval()
    x = torch.randn(2, 3, 32, 32, dtype=DTYPE)
    with untouched(model, x):
        rows = branch_relevance(model, x, target=1)
    assert [r["node"] for r in rows] == [f"layer{i}.{j}.add" for i in range(1, 5) for j in range(2)]
    for row in rows:
        branch, skip = (torch.tensor(v) for v in row["inputs"])
        torch.testing.assert_close(torch.tensor(row["share_of_last_input"]), skip / (branch + skip))
