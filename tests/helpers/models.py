"""Tiny hand-written models: every spelling of the operations the passes rewrite.

Each model maps images ``(N, 3, 8, 8)`` to 5 logits: a convolution stem, a
``block`` submodule that holds the operation under test (so functional nodes
get qualified names such as ``block.add``), global pooling and a linear head.
``bias=False`` builds the same model without any additive constant. Every
model here is built only of ReLU, linear/conv, pooling, additions,
concatenations, scalings by constants and reshapes, so both oracles of
DESIGN.md hold on it.

``TINY_MODELS`` maps a name to a factory ``f(bias=True) -> nn.Module``;
``FUNCTIONAL_OPS`` says which functional call each one spells (what the
passes must remove).
"""
import operator
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from captum.attr._utils.custom_modules import Addition_Module
from torch import Tensor, nn

__all__ = [
    "INPUT_SHAPE",
    "NUM_CLASSES",
    "example_input",
    "TinyNet",
    "TINY_MODELS",
    "FUNCTIONAL_OPS",
    "RELU_SPELLINGS",
    "SequentialNet",
    "TwoLayerLinear",
    "TwoInputNet",
    "OffsetNet",
    "SigmoidNet",
    "SharedConvNet",
    "ResidualNet",
    "AttributeSink",
    "Forwarding",
]

INPUT_SHAPE = (3, 8, 8)
NUM_CLASSES = 5
C = 4  # channels inside the block


def example_input(batch: int = 2, dtype=torch.float64) -> Tensor:
    return torch.randn((batch,) + INPUT_SHAPE, dtype=dtype)


def _conv(bias: bool, cin: int = C, cout: int = C) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1, bias=bias)


class TinyNet(nn.Module):
    """``fc(mean_pool(block(relu(stem(x)))))``; ``block`` is the operation under test."""

    def __init__(self, block: nn.Module, block_channels: int = C, bias: bool = True) -> None:
        super().__init__()
        self.stem = _conv(bias, 3, C)
        self.relu = nn.ReLU()
        self.block = block
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(block_channels, NUM_CLASSES, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.relu(self.stem(x)))
        return self.fc(torch.flatten(self.pool(h), 1))


class _TwoBranches(nn.Module):
    def __init__(self, bias: bool, branches: int = 2) -> None:
        super().__init__()
        self.a = _conv(bias)
        self.b = _conv(bias)
        if branches == 3:
            self.c = _conv(bias)


# --- additions ---------------------------------------------------------------
class AddOperator(_TwoBranches):
    def forward(self, x):
        return self.a(x) + self.b(x)


class AddInplace(_TwoBranches):
    def forward(self, x):
        y = self.a(x)
        y += self.b(x)
        return y


class TorchAdd(_TwoBranches):
    def forward(self, x):
        return torch.add(self.a(x), self.b(x))


class TorchAddAlpha(_TwoBranches):
    def forward(self, x):
        return torch.add(self.a(x), self.b(x), alpha=0.5)


class MethodAdd(_TwoBranches):
    def forward(self, x):
        return self.a(x).add(self.b(x))


class MethodAddInplace(_TwoBranches):
    def forward(self, x):
        y = self.a(x)
        y.add_(self.b(x))
        return y


class ThreeBranchSum(_TwoBranches):
    def __init__(self, bias: bool) -> None:
        super().__init__(bias, branches=3)

    def forward(self, x):
        return self.a(x) + self.b(x) + self.c(x)


class Residual(nn.Module):
    """A functional skip connection: ``x + relu(conv(x))``."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = _conv(bias)

    def forward(self, x):
        return x + F.relu(self.conv(x))


# --- concatenations ------------------------------------------------------------
class Cat(_TwoBranches):
    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 1)


class Concat(_TwoBranches):
    def forward(self, x):
        return torch.concat((self.a(x), self.b(x)), dim=1)


class StackFlatten(_TwoBranches):
    def forward(self, x):
        return torch.stack([self.a(x), self.b(x)], 1).flatten(1, 2)


# --- functional relu -----------------------------------------------------------
RELU_SPELLINGS: Dict[str, Callable[[nn.Module, Tensor], Tensor]] = {
    "F.relu": lambda m, h: F.relu(h),
    "torch.relu": lambda m, h: torch.relu(h),
    "Tensor.relu": lambda m, h: h.relu(),
    "Tensor.relu_": lambda m, h: h.relu_(),
    "torch.relu_": lambda m, h: torch.relu_(h),
    "F.relu(inplace=True)": lambda m, h: F.relu(h, inplace=True),
    "nn.ReLU(inplace=True)": lambda m, h: m.act(h),
}


class ReLUSpelling(nn.Module):
    """``spelling(conv(x))`` then a second convolution (so the ReLU is inside)."""

    def __init__(self, spelling: str, bias: bool) -> None:
        super().__init__()
        self.spelling = spelling
        self.a = _conv(bias)
        self.b = _conv(bias)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.b(RELU_SPELLINGS[self.spelling](self, self.a(x)))


class DiscardedInplace(nn.Module):
    """``h.relu_()`` whose result is not used: later readers of ``h`` see the ReLU."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = _conv(bias)
        self.b = _conv(bias)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        return self.b(h)


# --- functional pooling ----------------------------------------------------------
class FunctionalPooling(nn.Module):
    """``F.max_pool2d``, ``F.avg_pool2d`` and a global pooling spelled ``global_pool``."""

    def __init__(self, global_pool: str, bias: bool) -> None:
        super().__init__()
        self.global_pool = global_pool
        self.a = _conv(bias)
        self.b = _conv(bias)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.a(x)), 2)
        h = F.avg_pool2d(self.b(h), 2)
        if self.global_pool == "mean":
            h = h.mean((2, 3), keepdim=True)
        elif self.global_pool == "torch.mean":
            h = torch.mean(h, dim=(2, 3), keepdim=True)
        else:
            h = F.adaptive_avg_pool2d(h, 1)
        return h


class NoPoolHead(nn.Module):
    """A model whose global pooling is ``x.mean((2, 3))`` (no pooling module)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.stem = _conv(bias, 3, C)
        self.fc = nn.Linear(C, NUM_CLASSES, bias=bias)

    def forward(self, x):
        return self.fc(F.relu(self.stem(x)).mean((2, 3)))


# --- shared modules ---------------------------------------------------------------
class SharedReLU(nn.Module):
    """One ``nn.ReLU`` instance called after two convolutions."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.a = _conv(bias)
        self.b = _conv(bias)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.b(self.act(self.a(x))))


class SharedConv(nn.Module):
    """One ``nn.Conv2d`` applied twice."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv = _conv(bias)

    def forward(self, x):
        return self.conv(F.relu(self.conv(x)))


# --- scaling by constants ---------------------------------------------------------
class ScaledSum(_TwoBranches):
    """``a * 0.5 + b / 2`` and ``2.0 * a``."""

    def forward(self, x):
        a = self.a(x)
        return a * 0.5 + self.b(x) / 2 + 2.0 * a


def _tiny(block: Callable[[bool], nn.Module], channels: int = C) -> Callable[..., nn.Module]:
    def make(bias: bool = True) -> nn.Module:
        return TinyNet(block(bias), channels, bias).eval()

    return make


TINY_MODELS: Dict[str, Callable[..., nn.Module]] = {
    "a + b": _tiny(AddOperator),
    "a += b": _tiny(AddInplace),
    "torch.add(a, b)": _tiny(TorchAdd),
    "torch.add(a, b, alpha=0.5)": _tiny(TorchAddAlpha),
    "a.add(b)": _tiny(MethodAdd),
    "a.add_(b)": _tiny(MethodAddInplace),
    "a + b + c": _tiny(ThreeBranchSum),
    "x + relu(conv(x))": _tiny(Residual),
    "torch.cat": _tiny(Cat, 2 * C),
    "torch.concat": _tiny(Concat, 2 * C),
    "torch.stack + flatten": _tiny(StackFlatten, 2 * C),
    **{f"relu: {s}": _tiny(lambda bias, s=s: ReLUSpelling(s, bias)) for s in RELU_SPELLINGS},
    "h.relu_() discarded": _tiny(DiscardedInplace),
    "F.max_pool2d/avg_pool2d + F.adaptive_avg_pool2d": _tiny(lambda bias: FunctionalPooling("adaptive", bias)),
    "F.max_pool2d/avg_pool2d + x.mean((2,3))": _tiny(lambda bias: FunctionalPooling("mean", bias)),
    "F.max_pool2d/avg_pool2d + torch.mean": _tiny(lambda bias: FunctionalPooling("torch.mean", bias)),
    "x.mean((2,3)) head": lambda bias=True: NoPoolHead(bias).eval(),
    "shared nn.ReLU": _tiny(SharedReLU),
    "shared Conv2d": _tiny(SharedConv),
    "a * 0.5 + b / 2 + 2.0 * a": _tiny(ScaledSum),
}

# (op, target) pairs each model spells; the passes must leave none on the input path.
_ADD = [("call_function", operator.add), ("call_function", operator.iadd), ("call_function", torch.add),
        ("call_method", "add"), ("call_method", "add_")]
_RELU = [("call_function", F.relu), ("call_function", torch.relu), ("call_function", torch.relu_),
         ("call_method", "relu"), ("call_method", "relu_")]
_POOL = [("call_function", F.max_pool2d), ("call_function", F.avg_pool2d),
         ("call_function", F.adaptive_avg_pool2d), ("call_method", "mean"), ("call_function", torch.mean)]
FUNCTIONAL_OPS: Dict[str, List[Tuple[str, object]]] = {
    "a + b": _ADD,
    "a += b": _ADD,
    "torch.add(a, b)": _ADD,
    "torch.add(a, b, alpha=0.5)": _ADD,
    "a.add(b)": _ADD,
    "a.add_(b)": _ADD,
    "a + b + c": _ADD,
    "x + relu(conv(x))": _ADD + _RELU,
    "torch.cat": [("call_function", torch.cat)],
    "torch.concat": [("call_function", torch.concat), ("call_function", torch.cat)],
    "torch.stack + flatten": [("call_function", torch.stack)],
    **{f"relu: {s}": _RELU for s in RELU_SPELLINGS},
    "h.relu_() discarded": _RELU,
    "F.max_pool2d/avg_pool2d + F.adaptive_avg_pool2d": _POOL + _RELU,
    "F.max_pool2d/avg_pool2d + x.mean((2,3))": _POOL + _RELU,
    "F.max_pool2d/avg_pool2d + torch.mean": _POOL + _RELU,
    "x.mean((2,3)) head": _POOL + _RELU,
    "shared nn.ReLU": [],
    "shared Conv2d": _RELU,
    "a * 0.5 + b / 2 + 2.0 * a": _ADD + [("call_function", operator.mul), ("call_function", operator.truediv)],
}


# ---------------------------------------------------------------------------
# models for comparisons with vanilla Captum and hand computation
# ---------------------------------------------------------------------------
class SequentialNet(nn.Module):
    """conv -> (bn) -> relu -> maxpool -> linear: vanilla Captum's LRP is correct here.

    Only leaf modules Captum knows (Conv2d, BatchNorm2d, ReLU, MaxPool2d,
    Linear); flattening is a method call, which Captum leaves alone.
    """

    def __init__(self, batch_norm: bool = False, bias: bool = True, inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=bias)
        self.bn = nn.BatchNorm2d(3) if batch_norm else None
        self.relu = nn.ReLU(inplace=inplace)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(3 * 4 * 4, NUM_CLASSES, bias=bias)

    def forward(self, x):
        h = self.conv(x)
        if self.bn is not None:
            h = self.bn(h)
        return self.fc(self.pool(self.relu(h)).flatten(1))


class BottleneckNet(nn.Module):
    """conv-bn-relu-conv-bn, plus the block's input, relu, conv-bn, pool, linear: a ResNet block.

    With ``captum_addition`` the residual sum is Captum's ``Addition_Module``
    (where vanilla Captum's LRP is correct); otherwise it is ``out += x`` as
    torchvision writes it.
    """

    def __init__(self, captum_addition: bool = False) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 3, 3, padding=1), nn.BatchNorm2d(3)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        self.add = Addition_Module() if captum_addition else None
        self.conv3, self.bn3 = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(2 * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.add is not None:
            out = self.add(out, x)
        else:
            out += x
        out = self.pool(self.bn3(self.conv3(self.relu2(out))))
        return self.fc(out.flatten(1))


class DenseBlockNet(nn.Module):
    """A DenseNet block: each layer reads the concatenation of all features before it.

    With ``input_in_concatenation`` the model's input is one of the
    concatenated parts (a part whose relevance no layer's ratio gives).
    """

    def __init__(self, input_in_concatenation: bool = False) -> None:
        super().__init__()
        self.input_in_concatenation = input_in_concatenation
        stem = 3 if input_in_concatenation else 0
        self.conv0, self.norm0, self.relu0 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.norm1, self.relu1, self.conv1 = nn.BatchNorm2d(stem + 4), nn.ReLU(), nn.Conv2d(stem + 4, 2, 3, padding=1)
        self.norm2, self.relu2, self.conv2 = nn.BatchNorm2d(stem + 6), nn.ReLU(), nn.Conv2d(stem + 6, 2, 1)
        self.norm3, self.relu3 = nn.BatchNorm2d(stem + 8), nn.ReLU()
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear((stem + 8) * 4 * 4, NUM_CLASSES)

    def forward(self, x):
        features = [x] if self.input_in_concatenation else []
        features.append(self.relu0(self.norm0(self.conv0(x))))
        features.append(self.conv1(self.relu1(self.norm1(torch.cat(features, 1)))))
        features.append(self.conv2(self.relu2(self.norm2(torch.cat(features, 1)))))
        out = self.pool(self.relu3(self.norm3(torch.cat(features, 1))))
        return self.fc(out.flatten(1))


class TwoLayerLinear(nn.Module):
    """``fc2(relu(fc1(x)))`` with given weights, for hand-computed relevances."""

    def __init__(self, w1, b1, w2, b2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(len(w1[0]), len(w1))
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(len(w2[0]), len(w2))
        with torch.no_grad():
            for layer, w, b in ((self.fc1, w1, b1), (self.fc2, w2, b2)):
                layer.weight.copy_(torch.tensor(w))
                layer.bias.copy_(torch.tensor(b))

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class TwoInputNet(nn.Module):
    """``fc(relu(fa(x1) + fb(x2)))``: a model taking a tuple of inputs."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fa = nn.Linear(3, 4, bias=bias)
        self.fb = nn.Linear(2, 4, bias=bias)
        self.fc = nn.Linear(4, NUM_CLASSES, bias=bias)

    def forward(self, x1, x2):
        return self.fc(F.relu(self.fa(x1) + self.fb(x2)))


class OffsetNet(nn.Module):
    """``fc2(relu(fc1(x) * scale + offset))``: ``scale``, ``offset`` come as additional args."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4, bias=bias)
        self.fc2 = nn.Linear(4, NUM_CLASSES, bias=bias)

    def forward(self, x, scale, offset):
        return self.fc2(F.relu(self.fc1(x) * scale + offset))


class SigmoidNet(nn.Module):
    """A module vanilla Captum has no rule for (``nn.Sigmoid``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 4, bias=False)
        self.act = nn.Sigmoid()
        self.fc2 = nn.Linear(4, NUM_CLASSES, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SharedConvNet(nn.Module):
    """The same ``nn.Conv2d`` and ``nn.ReLU`` instances called twice (vanilla Captum refuses)."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(3 * 8 * 8, NUM_CLASSES, bias=bias)

    def forward(self, x):
        return self.fc(self.relu(self.conv(self.relu(self.conv(x)))).flatten(1))


class ResidualNet(nn.Module):
    """Two functional residual blocks ``h + conv(relu(conv(h)))`` between a stem and a head."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, C, 3, padding=1, bias=bias)
        self.relu = nn.ReLU()
        self.block1 = _Residual2(bias)
        self.block2 = _Residual2(bias)
        self.fc = nn.Linear(C * 8 * 8, NUM_CLASSES, bias=bias)

    def forward(self, x):
        h = self.block2(self.block1(self.relu(self.stem(x))))
        return self.fc(h.flatten(1))


class _Residual2(nn.Module):
    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.conv1 = _conv(bias)
        self.relu = nn.ReLU()
        self.conv2 = _conv(bias)

    def forward(self, x):
        return x + self.conv2(self.relu(self.conv1(x)))


class AttributeSink:
    """A plain object of the user's, to which a module forwards attributes (:class:`Forwarding`)."""

    def __init__(self) -> None:
        self.label = "sink"


class Forwarding(nn.Module):
    """Holds ``inner``; every other attribute is written to and read from ``sink``.

    ``torch.compile``'s wrapper forwards attribute writes to the model it
    wraps in the same way: a copy that sets attributes through
    ``__setattr__`` writes into the user's objects.
    """

    def __init__(self, inner: nn.Module, sink: AttributeSink) -> None:
        super().__init__()
        self.inner = inner
        self.__dict__["sink"] = sink

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["sink"], name)

    def __setattr__(self, name, value):
        if "sink" in self.__dict__ and not isinstance(value, (nn.Module, torch.Tensor)) and not hasattr(type(self), name):
            setattr(self.__dict__["sink"], name, value)
        else:
            super().__setattr__(name, value)

    def forward(self, x):
        return self.inner(x)
