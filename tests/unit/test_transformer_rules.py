"""What transformers need: outputs, token ids, Conv1D, written-out GELUs, and the cp-lrp / attn-lrp presets.

Checked against formulas in float64 with negligible epsilon; the Hugging Face
families themselves are in ``tests/zoo/test_zoo_hf.py``.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_graph.attr import LRP, LayerLRP
from captum_graph.errors import CaptureError, UnsupportedOperationError
from captum_graph.passes import elementwise_functions_to_modules
from captum_graph.prepare import prepare
from captum_graph.report import model_report
from captum_graph.rules import PRESETS, GateRule, SoftmaxRule, UniformSplitRule
from helpers.oracles import assert_matches_input_x_gradient, input_x_gradient, negligible_epsilon

pytestmark = pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients")
DTYPE = torch.float64


def _x(*shape):
    return torch.randn(*shape, dtype=DTYPE)


# ---------------------------------------------------------------------------
# the output Captum explains
# ---------------------------------------------------------------------------
class _Returns(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, bias=False)
        self.kind = kind

    def forward(self, x):
        logits = self.fc(x)
        if self.kind == "tuple":
            return logits, logits.sum()
        if self.kind == "dict":
            return {"loss": None, "logits": logits, "cache": [1, 2]}
        if self.kind == "model output":
            from transformers.modeling_outputs import SequenceClassifierOutput

            return SequenceClassifierOutput(logits=logits, hidden_states=(x,))
        return {"count": 3}


@pytest.mark.parametrize("kind", ["tuple", "dict", "model output"])
def test_the_first_tensor_of_a_tuple_or_mapping_is_explained(kind):
    if kind == "model output":
        pytest.importorskip("transformers")
    model, x = _Returns(kind).to(DTYPE).eval(), _x(2, 4)
    expected = x * model.fc.weight[1].detach()  # one linear layer: LRP-0 is x * w
    torch.testing.assert_close(LRP(model).attribute(x, target=1), expected)


def test_an_output_without_tensors_is_refused():
    with pytest.raises(CaptureError, match="holds no tensor"):
        LRP(_Returns("none").to(DTYPE).eval()).attribute(_x(2, 4), target=0)


# ---------------------------------------------------------------------------
# transformers' Conv1D: torch.addmm(bias, x, w)
# ---------------------------------------------------------------------------
class _Conv1D(nn.Module):
    def __init__(self, inputs: int, outputs: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(inputs, outputs) / inputs ** 0.5)
        self.bias = nn.Parameter(torch.randn(outputs) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)


def test_addmm_with_a_weight_is_a_linear_layer():
    model = nn.Sequential(_Conv1D(4, 6), nn.ReLU(), _Conv1D(6, 3)).to(DTYPE).eval()
    x = _x(5, 4)
    relevance = LRP(model, rules=negligible_epsilon()).attribute(x, target=2)
    assert_matches_input_x_gradient(relevance, input_x_gradient(model, x, target=2), "addmm")


def test_addmm_of_two_signals_is_refused():
    class Bilinear(nn.Module):
        def forward(self, x):
            return torch.addmm(x[:, 0], x, x.T)

    with pytest.raises(UnsupportedOperationError, match="addmm"):
        LRP(Bilinear()).attribute(_x(3, 3), target=0)


# ---------------------------------------------------------------------------
# token ids: relevance starts at the embedding lookup
# ---------------------------------------------------------------------------
class _TinyText(nn.Module):
    def __init__(self, frozen: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.embed.weight.requires_grad_(not frozen)
        self.mix = nn.Linear(6, 6, bias=False)
        self.head = nn.Linear(6, 3, bias=False)

    def forward(self, ids, mask):
        hidden = torch.relu(self.mix(self.embed(ids)))
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)  # padding dropped
        return self.head(hidden.sum(1))


@pytest.mark.parametrize("frozen", [False, True])
def test_layer_lrp_at_the_embedding_gives_relevance_per_token(frozen, assert_untouched):
    model = _TinyText(frozen).to(DTYPE).eval()
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0
    output = model(ids, mask)[:, 1].detach()
    with assert_untouched(model):
        relevance = LayerLRP(model, model.embed, rules=negligible_epsilon()).attribute(ids, 1, (mask,))
    by_name = LayerLRP(model, "embed", rules=negligible_epsilon()).attribute(ids, 1, (mask,))
    torch.testing.assert_close(relevance, by_name)
    assert relevance.shape == (2, 5, 6)
    torch.testing.assert_close(relevance.sum((1, 2)), output)  # bias-free: conserved
    assert relevance[1, 3:].abs().max() == 0  # padding gets none
    # the same as Gradient x Input at the embeddings (a ReLU network)
    embeddings = model.embed(ids).detach().requires_grad_()
    hidden = torch.relu(model.mix(embeddings)) * mask.unsqueeze(-1)
    (grad,) = torch.autograd.grad(model.head(hidden.sum(1))[:, 1].sum(), embeddings)
    torch.testing.assert_close(relevance, embeddings.detach() * grad)


def test_lrp_refuses_token_ids_and_says_what_to_do():
    model = _TinyText().to(DTYPE).eval()
    ids = torch.randint(0, 20, (2, 5))
    with pytest.raises(TypeError, match=r"LayerLRP\(model, model.get_input_embeddings\(\)\)"):
        LRP(model).attribute(ids, target=0, additional_forward_args=(torch.ones_like(ids),))


def test_an_integer_mask_carries_no_relevance():
    """Only the lookup starts relevance; ops on the mask need no rule."""
    model = _TinyText().to(DTYPE).eval()
    ids = torch.randint(0, 20, (2, 5))
    report = LayerLRP(model, "embed").rule_report(ids, (torch.ones_like(ids),))
    kinds = {a.qualname: a.module_type for a in report}
    assert kinds["embed.embedding"] == "Lookup"
    assert not any("unsqueeze" in a.qualname or "_to_copy" in a.qualname for a in report)


# ---------------------------------------------------------------------------
# an activation written out in operations
# ---------------------------------------------------------------------------
class _NewGELU(nn.Module):
    """GPT-2's activation, as transformers writes it."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class _HardSwish(nn.Module):
    def forward(self, x):
        return x * F.relu6(x + 3.0) / 6.0


@pytest.mark.parametrize("activation", [_NewGELU, _HardSwish])
def test_a_written_out_activation_becomes_one_pass_through_module(activation):
    model = nn.Sequential(nn.Linear(4, 8, bias=False), activation(), nn.Linear(8, 3, bias=False)).to(DTYPE).eval()
    x = _x(3, 4)
    gm = prepare(model, (x,)).graph_module
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.find_nodes(op="call_module")]
    assert kinds == ["Linear", "Elementwise", "Linear"]
    torch.testing.assert_close(gm(x), model(x))
    assert not elementwise_functions_to_modules(gm)  # idempotent
    relevance = LRP(model, rules=negligible_epsilon()).attribute(x, target=0)
    torch.testing.assert_close(relevance.sum(1), model(x)[:, 0].detach())  # nothing absorbed by its constants
    h = model[0](x).detach()  # the activation passes relevance through: R_h = h * w^T (R_a / a) ...
    a = model[1](h)
    r_h = a * model[2].weight[0]
    torch.testing.assert_close(relevance, x * ((r_h / h) @ model[0].weight))


def test_a_chain_of_activations_keeps_a_module_each():
    class Chain(nn.Module):
        def forward(self, x):
            return torch.sigmoid(F.gelu(torch.relu(x)) * 2.0)

    model = nn.Sequential(nn.Linear(4, 8), Chain()).eval()
    gm = prepare(model, (torch.randn(2, 4),)).graph_module
    kinds = [type(gm.get_submodule(n.target)).__name__ for n in gm.graph.find_nodes(op="call_module")]
    assert kinds == ["Linear", "Activation", "Activation", "Scale", "Activation"]


# ---------------------------------------------------------------------------
# the softmax under AttnLRP
# ---------------------------------------------------------------------------
class _SoftmaxHead(nn.Module):
    """``w . softmax(W x + mask)``: the softmax's output reaches the target linearly."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = nn.Linear(4, 5, bias=False)
        self.head = nn.Linear(5, 2, bias=False)
        self.register_buffer("blocked", torch.tensor([False, False, True, False, False]))

    def forward(self, x):
        return self.head(torch.softmax(self.scores(x).masked_fill(self.blocked, float("-inf")), -1))


def test_softmax_rule_is_the_first_order_taylor_terms():
    model = _SoftmaxHead().to(DTYPE).eval()
    x = _x(3, 4)
    rules = negligible_epsilon("attn-lrp")
    lrp = LayerLRP(model, "softmax", preset="attn-lrp", rules=rules)
    r_x = lrp.attribute(x, target=1, attribute_to_layer_input=True)
    r_s = lrp.attribute(x, target=1)
    z = model.scores(x).detach().masked_fill(model.blocked, float("-inf"))
    s = torch.softmax(z, -1)
    torch.testing.assert_close(r_s, s * model.head.weight[1])  # epsilon at the head
    expected = torch.where(torch.isfinite(z), z * (r_s - s * r_s.sum(-1, keepdim=True)), 0.0)
    torch.testing.assert_close(r_x, expected)
    assert r_x[:, 2].abs().max() == 0  # the masked score
    # what is conserved: sum R_x = sum_j R_s_j (z_j - sum_i s_i z_i); the rest (the bias term) is absorbed
    finite = torch.where(torch.isfinite(z), z, 0.0)
    mean_score = (s * finite).sum(-1, keepdim=True)
    torch.testing.assert_close(r_x.sum(-1), (r_s * (finite - mean_score)).sum(-1))
    relevance = LRP(model, preset="attn-lrp", rules=rules).attribute(x, target=1)
    torch.testing.assert_close(relevance.sum(1), r_x.sum(-1))  # the score layer conserves
    assert isinstance({a.qualname: a.rule for a in lrp.rule_report(x)}["softmax"], SoftmaxRule)


# ---------------------------------------------------------------------------
# attention: fused (scaled_dot_product_attention) and written out give the same relevance
# ---------------------------------------------------------------------------
class _Attention(nn.Module):
    def __init__(self, fused: bool, heads: int = 2, kv_heads: int = 2, mask: str = "none") -> None:
        super().__init__()
        self.fused, self.heads, self.kv_heads, self.mask = fused, heads, kv_heads, mask
        self.q = nn.Linear(8, 8, bias=False)
        self.k = nn.Linear(8, 4 * kv_heads, bias=False)
        self.v = nn.Linear(8, 4 * kv_heads, bias=False)
        self.out = nn.Linear(8, 3, bias=False)

    def forward(self, x):
        n, t, _ = x.shape
        q = self.q(x).reshape(n, t, self.heads, 4).transpose(1, 2)
        k = self.k(x).reshape(n, t, self.kv_heads, 4).transpose(1, 2)
        v = self.v(x).reshape(n, t, self.kv_heads, 4).transpose(1, 2)
        blocked = torch.ones(t, t, dtype=torch.bool).triu(1) if self.mask != "none" else None
        if self.fused:
            mask = None if blocked is None else ~blocked
            if self.mask == "float":
                mask = torch.zeros(t, t, dtype=x.dtype).masked_fill(blocked, torch.finfo(x.dtype).min)
            causal = self.mask == "causal"
            heads = self.heads != self.kv_heads
            o = F.scaled_dot_product_attention(q, k, v, None if causal else mask, is_causal=causal, enable_gqa=heads)
        else:
            k = k.repeat_interleave(self.heads // self.kv_heads, 1)
            v = v.repeat_interleave(self.heads // self.kv_heads, 1)
            scores = q @ k.transpose(-1, -2) / 2.0
            if blocked is not None:
                scores = scores.masked_fill(blocked, torch.finfo(x.dtype).min)
            o = torch.softmax(scores, -1) @ v
        return self.out(o.transpose(1, 2).reshape(n, t, 8).mean(1))


@pytest.mark.parametrize("mask, kv_heads", [("none", 2), ("bool", 2), ("float", 2), ("causal", 2), ("causal", 1)])
@pytest.mark.parametrize("preset", ["cp-lrp", "attn-lrp"])
def test_fused_attention_equals_the_written_out_one(preset, mask, kv_heads):
    fused = _Attention(True, kv_heads=kv_heads, mask=mask).to(DTYPE).eval()
    written = _Attention(False, kv_heads=kv_heads, mask=mask).to(DTYPE).eval()
    written.load_state_dict(fused.state_dict())
    x = _x(2, 5, 8)
    torch.testing.assert_close(fused(x), written(x))
    rules = negligible_epsilon(preset)
    got = LRP(fused, preset=preset, rules=rules).attribute(x, target=1)
    want = LRP(written, preset=preset, rules=rules).attribute(x, target=1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    if preset == "cp-lrp":  # probabilities constant, the rest linear: conserved
        torch.testing.assert_close(got.flatten(1).sum(1), fused(x)[:, 1].detach())


def test_attn_lrp_splits_probabilities_times_values_in_half():
    model = _Attention(False).to(DTYPE).eval()
    x = _x(2, 5, 8)
    lrp = LayerLRP(model, "matmul_1", preset="attn-lrp", rules=negligible_epsilon("attn-lrp"))
    probabilities, values = lrp.attribute(x, target=0, attribute_to_layer_input=True)
    out = lrp.attribute(x, target=0)
    torch.testing.assert_close(probabilities.flatten(1).sum(1), out.flatten(1).sum(1) / 2)
    torch.testing.assert_close(values.flatten(1).sum(1), out.flatten(1).sum(1) / 2)
    cp = LayerLRP(model, "matmul_1", preset="cp-lrp").attribute(x, target=0, attribute_to_layer_input=True)
    assert not isinstance(cp, tuple)  # CP-LRP: the probabilities are constants, all relevance to the values


# ---------------------------------------------------------------------------
# gated linear units (SwiGLU)
# ---------------------------------------------------------------------------
class _SwiGLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 6, bias=False)
        self.up = nn.Linear(4, 6, bias=False)
        self.down = nn.Linear(6, 2, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def test_gated_linear_unit_under_each_preset():
    model = _SwiGLU().to(DTYPE).eval()
    x = _x(3, 4)
    output = model(x)[:, 0].detach()
    g, u = F.silu(model.gate(x)).detach(), model.up(x).detach()
    r_product = g * u * model.down.weight[0]

    cp = LayerLRP(model, ["up", "gate"], preset="cp-lrp", rules=negligible_epsilon("cp-lrp"))
    r_up, r_gate = cp.attribute(x, target=0)
    torch.testing.assert_close(r_up, r_product)  # the activated factor is a constant gate
    assert r_gate.abs().max() == 0
    torch.testing.assert_close(LRP(model, preset="cp-lrp").attribute(x, target=0).sum(1), output)
    assert isinstance({a.qualname: a.rule for a in cp.rule_report(x)}["mul"], GateRule)

    attn = LayerLRP(model, ["up", "gate"], preset="attn-lrp", rules=negligible_epsilon("attn-lrp"))
    r_up, r_gate = attn.attribute(x, target=0)
    torch.testing.assert_close(r_up, r_product / 2)  # uniform rule, identity rule on SiLU
    torch.testing.assert_close(r_gate, r_product / 2)
    relevance = LRP(model, preset="attn-lrp", rules=negligible_epsilon("attn-lrp")).attribute(x, target=0)
    torch.testing.assert_close(relevance.sum(1), output)

    report = model_report(model, inputs=(x,))  # no preset: the uniform split, with a warning
    assert [r["module"] for r in report["rules"] if r["node"] == "mul"] == ["GatedProduct"]
    assert len(report["warnings"]) == 1
    assert model_report(model, preset="attn-lrp", inputs=(x,))["warnings"] == []  # chosen, not guessed


def test_presets_are_listed_and_validated():
    assert {"cp-lrp", "attn-lrp"} <= set(PRESETS)
    assert any(isinstance(factory(), UniformSplitRule) for _, factory in PRESETS["attn-lrp"].layers)
    with pytest.raises(ValueError, match="attn-lrp"):
        LRP(nn.Linear(2, 2), preset="attnlrp")
