"""Rules for the operations that the timm and torchvision zoos need, on the ATen graph (float64).

Each block below is written the way model libraries write it (functional calls,
casts, in-place updates); on a bias-free copy relevance is conserved exactly
(DESIGN.md oracle 2), and where the block is piecewise linear, LRP with a
negligible epsilon equals Gradient x Input (oracle 1). Every block is also
checked to become the intended leaf module, so a test cannot pass by the
operation silently going another way.
"""
import pytest
import torch
import torch.nn.functional as F
from captum.attr._utils.lrp_rules import EpsilonRule
from torch import nn

from captum_graph import UnsupportedOperationError, prepare
from captum_graph import modules as M
from captum_graph.attr import LRP
from captum_graph.rules import EPSILON_TYPES, assign_rules
from helpers.oracles import assert_conserves, assert_matches_input_x_gradient, input_x_gradient

DTYPE = torch.float64
TINY = {EPSILON_TYPES: EpsilonRule(1e-15)}


class Net(nn.Module):
    """Conv stem, the block under test, a linear head; bias-free unless asked."""

    def __init__(self, block: nn.Module, channels: int = 4, bias: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=bias)
        self.block = block
        self.head = nn.Linear(channels, 5, bias=bias)

    def forward(self, x):
        return self.head(self.block(torch.relu(self.stem(x))).mean((2, 3)))


class Normalize(nn.Module):
    def forward(self, x):
        return F.normalize(x, dim=1) * 3.0


class RMSNorm(nn.Module):
    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x * self.weight).permute(0, 3, 1, 2)


class Affine(nn.Module):
    """ResMLP's affine: ``addcmul(beta, alpha, x)``."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)
        self.beta = nn.Parameter(torch.zeros(channels, 1, 1))

    def forward(self, x):
        return torch.addcmul(self.beta, self.alpha, x)


class Movement(nn.Module):
    """Casts, padding, roll and a window partition and merge, as Swin writes them."""

    def forward(self, x):
        n, c, h, w = x.shape
        y = F.pad(x.to(torch.float64).type_as(x).contiguous(), (0, 2, 0, 2))
        y = torch.roll(y, shifts=(1, 1), dims=(2, 3))
        windows = y.view(n, c, (h + 2) // 2, 2, (w + 2) // 2, 2).permute(0, 2, 4, 1, 3, 5)
        merged = windows.permute(0, 3, 1, 4, 2, 5).reshape(n, c, h + 2, w + 2)
        return merged[:, :, 1 : h + 1, 1 : w + 1]


class Upsample(nn.Module):
    def forward(self, x):
        return F.interpolate(F.interpolate(x, scale_factor=2, mode="bilinear"), size=x.shape[-2:], mode="nearest")


class DropPath(nn.Module):
    """Stochastic depth as timm writes it: the identity in eval."""

    def forward(self, x):
        if not self.training:
            return x
        keep = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype) > 0.5
        return x * keep / 0.5


class Attention(nn.Module):
    """Tokens through scaled_dot_product_attention, back to a map."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.qkv = nn.Linear(channels, 3 * channels, bias=False)
        self.proj = nn.Linear(channels, channels, bias=False)

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(n, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, h * w, c)
        return (tokens + self.proj(out)).transpose(1, 2).reshape(n, c, h, w)


class ExplicitAttention(Attention):
    """The same with the softmax written out, as timm's non-fused path does."""

    def forward(self, x):
        n, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = self.qkv(tokens).reshape(n, h * w, 3, 2, c // 2).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * (c // 2) ** -0.5) @ k.transpose(-2, -1)
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n, h * w, c)
        return (tokens + self.proj(out)).transpose(1, 2).reshape(n, c, h, w)


# block -> the leaf module type its operation must become (None: data movement only)
BLOCKS = {
    "F.normalize": (Normalize, M.Scale),
    "RMSNorm": (RMSNorm, M.Scale),
    "addcmul": (Affine, M.LinearFunction),
    "movement": (Movement, None),
    "interpolate": (Upsample, M.LinearFunction),
    "drop path": (DropPath, None),
    "sdpa": (Attention, M.Attention),
    "softmax attention": (ExplicitAttention, M.AttentionMatmul),
}


def _model(name: str, bias: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return Net(BLOCKS[name][0](), bias=bias).to(DTYPE).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, dtype=DTYPE)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_conserves_relevance(name):
    model, x = _model(name), _x()
    relevance = LRP(model, rules=TINY).attribute(x, target=[1, 3])
    with torch.no_grad():
        logits = model(x)[torch.arange(2), torch.tensor([1, 3])]
    assert_conserves(relevance, logits, name)


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_becomes_its_leaf_module_and_every_node_has_a_rule(name):
    model, x = _model(name), _x()
    gm = prepare(model, (x,)).graph_module
    assignments = assign_rules(gm)
    assert not [a.problem for a in assignments if a.problem]
    expected = BLOCKS[name][1]
    kinds = {type(gm.get_submodule(n.target)) for n in gm.graph.find_nodes(op="call_module") if n.target.startswith("block.")}
    if expected is None:
        assert not kinds, f"{name}: only data movement expected, got {kinds}"
    else:
        assert expected in kinds, f"{name}: no {expected.__name__} among {kinds}"


@pytest.mark.parametrize("name", ["movement", "interpolate", "drop path", "addcmul"])
def test_piecewise_linear_block_equals_gradient_times_input(name):
    model, x = _model(name, bias=True), _x()
    relevance = LRP(model, rules=TINY).attribute(x, target=2)
    assert_matches_input_x_gradient(relevance, input_x_gradient(model, x, target=2), name, rtol=1e-6, atol_factor=1e-10)


def test_product_of_two_signals_in_addcmul_is_refused_with_its_source_line():
    class Square(nn.Module):
        def forward(self, x):
            return torch.addcmul(x, x, x.flip(1))  # the refused line

    model, x = Net(Square()).to(DTYPE).eval(), _x()
    with pytest.raises(UnsupportedOperationError, match=r"block\.addcmul[\s\S]*test_aten_rules.py:\d+: return torch.addcmul"):
        LRP(model).attribute(x, target=0)


def test_inplace_write_into_a_view_that_carries_relevance_is_refused():
    class SliceAssign(nn.Module):
        def forward(self, x):
            y = x.clone()
            y[:, :2] += x[:, 2:]  # an in-place write into a view of y
            return y

    model, x = Net(SliceAssign()).to(DTYPE).eval(), _x()
    with pytest.raises(UnsupportedOperationError, match="in-place write into a view"):
        LRP(model).attribute(x, target=0)
