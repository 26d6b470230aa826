"""The README's demo: train a small residual CNN on scikit-learn's digits and explain it.

``captum-graph demo`` (or ``python -m captum_graph demo``, or ``make demo``):

1. trains :class:`DigitsNet` -- residual additions written as ``+``, a
   ``torch.cat`` of two branches and a squeeze-excitation gate
   ``x * torch.sigmoid(s)``, the operations Captum's LRP cannot see -- on the
   8x8 digits that ship with scikit-learn (no download);
2. explains a grid of test digits with captum_graph's LRP (Captum's default
   rules and the ``epsilon-gamma-box`` preset), automatic Grad-CAM and Captum's
   InputXGradient, and draws them (``explanations.png``);
3. checks conservation: the sum of each map against the logit it explains
   (``conservation.csv``);
4. measures faithfulness by pixel flipping: the most relevant pixels are
   deleted first and the logit should fall fast; the area over the
   perturbation curve (AOPC) is compared with deleting pixels in random order
   (``pixel_flipping.png``, ``pixel_flipping.csv``).

The pieces are importable, so the tutorials share the model::

    >>> from captum_graph.demo import load_digits_data, train_digits_model
    >>> data = load_digits_data(seed=0)
    >>> model = train_digits_model(data, epochs=4, seed=0)  # eval mode
"""
import argparse
import contextlib
import csv
import os
import sys
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Pixel flipping is shared with dataset-scale evaluation; the names stay importable from here.
from .perturbation import aopc, pixel_flipping, random_pixel_flipping

__all__ = [
    "DigitsNet",
    "DigitsData",
    "load_digits_data",
    "train_digits_model",
    "accuracy",
    "pick_examples",
    "explainers",
    "conservation_table",
    "captum_lrp",
    "without_additive_constants",
    "exact_conservation_check",
    "single_thread",
    "pixel_flipping",
    "random_pixel_flipping",
    "aopc",
    "run_demo",
    "DEMO_PRESET",
]

#: The LRP preset the demo shows next to Captum's default rules, recommended by
#: ``benchmarks/faithfulness.py``: of the presets that conserve relevance, the one whose
#: relevance falls most inside the evidence on digits pasted on a noisy canvas, classified by
#: this model's blocks (relevance mass 0.68; Input x Gradient 0.36, Grad-CAM 0.30).
DEMO_PRESET = "epsilon-gamma-box"
#: The range of the demo's pixels (the box rule's bounds).
INPUT_RANGE = (0.0, 1.0)
#: Epochs and shown examples of a full run and of ``--fast``.
EPOCHS, FAST_EPOCHS = 6, 2
EXAMPLES, FAST_EXAMPLES = 10, 4


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------
def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class ResidualBlock(nn.Module):
    """``relu(x + conv_bn(relu(conv_bn(x))))``: the skip connection is a functional ``+``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(channels, channels, 3)
        self.conv2 = _conv_bn(channels, channels, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class SqueezeExcitation(nn.Module):
    """Channel gate ``x * sigmoid(fc2(relu(fc1(mean(x)))))`` (Hu et al., 2018)."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, channels // reduction)
        self.fc2 = nn.Linear(channels // reduction, channels)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        # sigmoid last, right before the product: captum_graph recognises ``x * sigmoid(s)`` as a gate
        return x * torch.sigmoid(scale[:, :, None, None])


class DigitsNet(nn.Module):
    """A small CNN for 8x8 digits with the operations that trip up plain Captum.

    ``stem -> block1 (residual +) -> cat(branch_a, branch_b) -> se (gate)
    -> block2 (residual +) -> mean -> head``. Every feature map stays 8x8, so
    Grad-CAM's map has the input's resolution.

    Args:
        width: channels after the stem; the concatenation doubles them.
        classes: number of outputs.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = _conv_bn(1, width, 3)
        self.block1 = ResidualBlock(width)
        self.branch_a = _conv_bn(width, width, 1)
        self.branch_b = _conv_bn(width, width, 3)
        self.se = SqueezeExcitation(2 * width)
        self.block2 = ResidualBlock(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block1(F.relu(self.stem(x)))
        x = F.relu(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1))
        x = self.block2(self.se(x))
        return self.head(x.mean((2, 3)))


# ---------------------------------------------------------------------------
# data and training
# ---------------------------------------------------------------------------
class DigitsData(NamedTuple):
    """scikit-learn's digits as ``(N, 1, 8, 8)`` float tensors in ``[0, 1]`` (background 0)."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """The 1797 digits bundled with scikit-learn, split (stratified) by ``seed``."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise ImportError(
            "the demo needs scikit-learn: pip install scikit-learn (or pip install 'captum_graph[demo]')"
        ) from error
    images, labels = load_digits(return_X_y=True)
    train, test = train_test_split(
        range(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    images = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    labels = torch.tensor(labels, dtype=torch.long)
    return DigitsData(images[list(train)], labels[list(train)], images[list(test)], labels[list(test)])


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, restoring the previous count after.

    The demo's tensors are tiny (a batch of 32 8x8 maps): splitting such
    kernels across threads costs more than it saves, and on a busy machine
    waiting threads make a step several times slower (measured: 24 ms per
    training step on one thread against 130-900 ms on two, 2-core machine
    under load).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Fraction of ``images`` classified correctly (the model's mode is left as it is)."""
    return (model(images).argmax(1) == labels).double().mean().item()


def train_digits_model(
    data: Optional[DigitsData] = None,
    epochs: int = EPOCHS,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 1e-2,
    progress: bool = True,
) -> DigitsNet:
    """Train :class:`DigitsNet` with Adam and a cosine schedule; deterministic for a ``seed``.

    Six epochs reach about 99 % test accuracy (two about 95 %) in seconds on
    two CPU cores.

    Args:
        data: from :func:`load_digits_data` (loaded with ``seed`` if omitted).
        epochs: passes over the training set.
        seed: seeds the weights and the batch order.
        batch_size, learning_rate: Adam's.
        progress: show a progress bar (tqdm on a terminal, else a line per epoch).

    Returns:
        The trained model, in eval mode.
    """
    data = data if data is not None else load_digits_data(seed)
    torch.manual_seed(seed)
    model = DigitsNet()
    order = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    batches = -(-len(data.train_labels) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * batches))
    bar = _progress_bar(epochs * batches) if progress else None
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(single_thread())
        if bar is not None:
            cleanup.callback(bar.close)
        for epoch in range(epochs):
            model.train()
            permutation = torch.randperm(len(data.train_labels), generator=order)
            seen, total_loss = 0, 0.0
            for start in range(0, len(permutation), batch_size):
                batch = permutation[start : start + batch_size]
                if len(batch) < 2:  # batch norm needs two samples
                    continue
                loss = F.cross_entropy(model(data.train_images[batch]), data.train_labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                seen, total_loss = seen + len(batch), total_loss + loss.item() * len(batch)
                if bar is not None:
                    bar.update(1)
            model.eval()
            test_accuracy = accuracy(model, data.test_images, data.test_labels)
            mean_loss = total_loss / max(seen, 1)
            if bar is not None:
                bar.set_postfix(epoch=f"{epoch + 1}/{epochs}", loss=f"{mean_loss:.3f}", test_acc=f"{test_accuracy:.1%}")
            elif progress:
                print(f"  epoch {epoch + 1}/{epochs}  loss {mean_loss:.3f}  test accuracy {test_accuracy:.1%}", flush=True)
    return model.eval()


def _progress_bar(total: int):
    """A tqdm bar on a terminal; ``None`` (a printed line per epoch) without tqdm or a terminal, e.g. in CI logs."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    if not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc="training", unit="batch", leave=True, dynamic_ncols=True)


# ---------------------------------------------------------------------------
# explanations
# ---------------------------------------------------------------------------
Explainer = Callable[[Tensor, Tensor], Tensor]


def explainers(model: nn.Module, preset: str = DEMO_PRESET) -> Dict[str, Tuple[str, Explainer]]:
    """The demo's methods: ``{key: (label, explain(images, targets) -> (N, 1, H, W))}``.

    ``lrp_epsilon`` (captum_graph LRP with Captum's default rules),
    ``lrp_<preset>`` (the preset, batch norms folded into the convolutions
    before them, as zennit's canonizers do), ``gradcam`` (captum_graph's
    automatic layer, upsampled to the input) and ``input_x_gradient``
    (Captum's).
    """
    from captum.attr import InputXGradient

    from .attr import LRP, LayerGradCam
    from .rules import with_input_bounds
    from .viz import upsample

    lrp = LRP(model)
    lrp_preset = LRP(model, preset=with_input_bounds(preset, *INPUT_RANGE), fold_batch_norm=True)
    cam, ixg = LayerGradCam(model), InputXGradient(model)

    def gradcam(images: Tensor, targets: Tensor) -> Tensor:
        maps = cam.attribute(images, target=targets, relu_attributions=True).detach()
        return torch.stack([upsample(m, images.shape[-2:]) for m in maps]).to(images.dtype)

    def gradient_based(method) -> Explainer:
        # Inputs that already require gradients spare Captum's "did not already require gradients" warning.
        return lambda images, targets: method.attribute(images.detach().requires_grad_(), target=targets).detach()

    return {
        "lrp_epsilon": ("LRP ε (Captum's rules)", gradient_based(lrp)),
        f"lrp_{preset.replace('-', '_')}": (f"LRP {preset} (BN folded)", gradient_based(lrp_preset)),
        "gradcam": ("Grad-CAM (automatic layer)", gradcam),
        "input_x_gradient": ("Input × Gradient", gradient_based(ixg)),
    }


def pick_examples(labels: Tensor, count: int) -> Tensor:
    """Indices of ``count`` test examples: the first of each class in turn (0, 1, 2, ...)."""
    chosen: List[int] = []
    classes = sorted(set(labels.tolist()))
    while len(chosen) < min(count, len(labels)):
        for cls in classes:
            candidates = [i for i in (labels == cls).nonzero().flatten().tolist() if i not in chosen]
            if candidates and len(chosen) < count:
                chosen.append(candidates[0])
    return torch.tensor(chosen)


def conservation_table(
    model: nn.Module, images: Tensor, labels: Tensor, targets: Tensor, maps: Dict[str, Tensor]
) -> List[Dict[str, float]]:
    """Per example: true and explained class, the logit, and the sum of each map.

    Grad-CAM is left out: it is not meant to sum to anything.
    """
    logits = _target_logits(model, images, targets)
    rows = []
    for i in range(len(images)):
        row: Dict[str, float] = {"example": i, "true": int(labels[i]), "predicted": int(targets[i]), "logit": logits[i].item()}
        row.update({key: m[i].sum().item() for key, m in maps.items() if key != "gradcam"})
        rows.append(row)
    return rows


@torch.no_grad()
def _target_logits(model: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
    return model(images).gather(1, targets[:, None]).squeeze(1)


def captum_lrp(model: nn.Module, images: Tensor, targets: Tensor) -> Optional[Tensor]:
    """Plain ``captum.attr.LRP`` on a copy of ``model`` (``None`` if Captum refuses the model).

    The copy keeps the ``rule`` attributes Captum attaches to modules away
    from the model the other methods explain.
    """
    import copy

    from captum.attr import LRP as CaptumLRP

    try:
        return CaptumLRP(copy.deepcopy(model)).attribute(images.detach().requires_grad_(), target=targets).detach()
    except (TypeError, RuntimeError):
        return None


def without_additive_constants(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every bias and batch-norm running mean set to zero.

    On such a model LRP's relevance sums exactly to the explained logit
    (the conservation oracle of captum_graph's tests).
    """
    import copy

    bias_free = copy.deepcopy(model)
    with torch.no_grad():
        for name, tensor in list(bias_free.named_parameters()) + list(bias_free.named_buffers()):
            if name.rsplit(".", 1)[-1] in ("bias", "running_mean"):
                tensor.zero_()
    return bias_free.eval()


def exact_conservation_check(model: nn.Module, images: Tensor, targets: Tensor) -> Dict[str, float]:
    """Largest ``|sum of relevance - logit| / |logit|`` on the model without additive constants.

    For captum_graph's LRP (Captum's epsilon rules) and, where it runs, Captum's own LRP.
    """
    from .attr import LRP

    bias_free = without_additive_constants(model)
    logits = _target_logits(bias_free, images, targets)
    sums = {"captum_graph": LRP(bias_free).attribute(images.detach().requires_grad_(), target=targets).detach()}
    theirs = captum_lrp(bias_free, images, targets)
    if theirs is not None:
        sums["captum"] = theirs
    scale = logits.abs().clamp(min=1e-12)
    return {key: ((r.flatten(1).sum(1) - logits).abs() / scale).max().item() for key, r in sums.items()}


# ---------------------------------------------------------------------------
# figures and files
# ---------------------------------------------------------------------------
def _explanation_figure(
    images: Tensor, labels: Tensor, targets: Tensor, maps: Dict[str, Tensor], labels_of: Dict[str, str], path: str
) -> None:
    from . import viz

    figure = viz.new_figure(1 + len(maps), len(images), cell_size=1.5)
    axes = figure.axes
    columns = len(images)
    for j in range(columns):
        ok = "" if int(targets[j]) == int(labels[j]) else "  ✗"
        viz.show_image(images[j], axes[j], title=f"pred {int(targets[j])} / true {int(labels[j])}{ok}")
    for row, (key, attribution) in enumerate(maps.items(), start=1):
        for j in range(columns):
            ax = axes[row * columns + j]
            if key == "gradcam":
                viz.gradcam_overlay(attribution[j], images[j], ax)
            else:
                viz.relevance_map(attribution[j], ax)
        axes[row * columns].set_ylabel(labels_of[key].replace(" (", "\n("), fontsize="small")
    axes[0].set_ylabel("input", fontsize="small")
    figure.suptitle(
        "captum_graph on a residual CNN (digits): red = for the predicted class, blue = against", fontsize="medium"
    )
    figure.savefig(path, dpi=100)


def _flipping_figure(curves: Dict[str, Tensor], labels_of: Dict[str, str], scores: Dict[str, float], path: str) -> None:
    from . import viz

    figure = viz.new_figure(1, 1, cell_size=5.0)
    ax = figure.axes[0]
    for key, curve in curves.items():
        mean = curve.mean(0)
        steps = torch.arange(len(mean)) / (len(mean) - 1)
        style = dict(color="grey", linestyle="--") if key == "random" else {}
        ax.plot(steps.numpy(), mean.numpy(), label=f"{labels_of[key]}  AOPC {scores[key]:.2f}", **style)
    ax.set_xlabel("fraction of pixels deleted (most relevant first)")
    ax.set_ylabel("logit of the explained class (mean)")
    ax.set_title("Pixel flipping: a steeper fall is a more faithful explanation", fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    figure.savefig(path, dpi=100)


def _write_csv(path: str, rows: Sequence[Dict[str, object]]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _print_conservation(rows: List[Dict[str, float]], keys: Sequence[str]) -> None:
    widths = [max(len(k), 10) for k in keys]
    print(f"  {'#':>3} {'true':>4} {'pred':>4} {'logit':>8}" + "".join(f" {k:>{w}}" for k, w in zip(keys, widths)))
    for row in rows:
        print(
            f"  {row['example']:>3} {row['true']:>4} {row['predicted']:>4} {row['logit']:>8.3f}"
            + "".join(f" {row[k]:>{w}.3f}" for k, w in zip(keys, widths))
        )
    total = sum(abs(r["logit"]) for r in rows)
    gaps = [sum(abs(r[k] - r["logit"]) for r in rows) / total for k in keys]
    print(f"  {'relative gap *':>22}" + "".join(f" {g:>{w}.1%}" for g, w in zip(gaps, widths)))
    print("  * sum over examples of |sum of relevance - logit|, divided by the sum of |logit|")


# ---------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``demo`` subcommand's options."""
    parser.add_argument("--out", default="captum_graph_demo", metavar="DIR", help="output directory (default: %(default)s/)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batch order (default: %(default)s)")
    parser.add_argument("--fast", action="store_true", help=f"{FAST_EPOCHS} epochs and {FAST_EXAMPLES} examples (for tests)")
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default: {EPOCHS}, {FAST_EPOCHS} with --fast)")
    parser.add_argument("--examples", type=int, default=None, help=f"test digits to explain (default: {EXAMPLES}, {FAST_EXAMPLES} with --fast)")
    parser.add_argument("--preset", default=DEMO_PRESET, help="LRP preset shown next to the default rules (default: %(default)s)")


def run_demo(args: argparse.Namespace) -> int:
    """Train, explain, check conservation, pixel-flip; write everything to ``args.out``."""
    seed = getattr(args, "seed", 0)
    fast = getattr(args, "fast", False)
    out = getattr(args, "out", "captum_graph_demo")
    preset = getattr(args, "preset", DEMO_PRESET)
    epochs = getattr(args, "epochs", None) or (FAST_EPOCHS if fast else EPOCHS)
    count = getattr(args, "examples", None) or (FAST_EXAMPLES if fast else EXAMPLES)
    from .rules import PRESETS
    from .viz import require_matplotlib

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    require_matplotlib()  # fail before training, not after
    os.makedirs(out, exist_ok=True)
    with single_thread():
        return _run_demo(out, seed, fast, preset, epochs, count)


def _run_demo(out: str, seed: int, fast: bool, preset: str, epochs: int, count: int) -> int:
    data = load_digits_data(seed)
    print(
        f"Training DigitsNet (residual +, torch.cat, squeeze-excitation gate) on {len(data.train_labels)} "
        f"scikit-learn digits, {epochs} epochs, seed {seed}"
    )
    started = time.perf_counter()
    model = train_digits_model(data, epochs=epochs, seed=seed)
    elapsed = time.perf_counter() - started
    test_accuracy = accuracy(model, data.test_images, data.test_labels)
    print(f"Test accuracy: {test_accuracy:.1%} on {len(data.test_labels)} held-out digits (trained in {elapsed:.1f} s)")

    chosen = pick_examples(data.test_labels, count)
    images, labels = data.test_images[chosen], data.test_labels[chosen]
    with torch.no_grad():
        targets = model(images).argmax(1)
    methods = explainers(model, preset)
    labels_of = {key: label for key, (label, _) in methods.items()}
    maps = {key: explain(images, targets) for key, (_, explain) in methods.items()}
    print(f"\nExplaining {len(images)} test digits (the predicted class) with: " + "; ".join(labels_of.values()))

    paths = {
        "explanations": os.path.join(out, "explanations.png"),
        "conservation": os.path.join(out, "conservation.csv"),
        "flipping_png": os.path.join(out, "pixel_flipping.png"),
        "flipping_csv": os.path.join(out, "pixel_flipping.csv"),
    }
    _explanation_figure(images, labels, targets, maps, labels_of, paths["explanations"])

    theirs = captum_lrp(model, images, targets)
    summed = dict(maps, **({} if theirs is None else {"captum_lrp": theirs}))
    rows = conservation_table(model, images, labels, targets, summed)
    print("\nConservation: the sum of each map against the logit it explains. LRP leaves the share of biases")
    print("and batch-norm shifts out; plain captum.attr.LRP (captum_lrp) does not see +, torch.cat or the gate:")
    _print_conservation(rows, [k for k in summed if k != "gradcam"])
    _write_csv(paths["conservation"], rows)
    exact = exact_conservation_check(model, images, targets)
    print("Exact check on a copy with biases and batch-norm means at zero, max |sum - logit| / |logit|:")
    print("  " + "; ".join(f"{key} LRP {value:.1e}" for key, value in exact.items()))

    # Pixel flipping on all test digits the model gets right, not only the few drawn.
    with torch.no_grad():
        predicted = model(data.test_images).argmax(1)
    correct = (predicted == data.test_labels).nonzero().flatten()[: 32 if fast else 128]
    flip_images, flip_targets = data.test_images[correct], predicted[correct]
    curves = {
        key: pixel_flipping(model, flip_images, flip_targets, explain(flip_images, flip_targets))
        for key, (_, explain) in methods.items()
    }
    curves["random"] = random_pixel_flipping(model, flip_images, flip_targets, repeats=2 if fast else 4, seed=seed)
    labels_of["random"] = "random order"
    scores = {key: aopc(curve) for key, curve in curves.items()}
    print(f"\nPixel flipping: delete pixels (set to 0) 4 at a time, most relevant first, on {len(correct)} correctly")
    print("classified test digits. AOPC = mean drop of the logit over all steps; higher is more faithful:")
    for key, score in sorted(scores.items(), key=lambda item: -item[1]):
        print(f"  {labels_of[key]:<36} AOPC {score:6.3f}")
    _flipping_figure(curves, labels_of, scores, paths["flipping_png"])
    _write_csv(
        paths["flipping_csv"],
        [
            {"pixels_deleted": min(4 * point, images[0].numel()), **{key: round(curve.mean(0)[point].item(), 6) for key, curve in curves.items()}}
            for point in range(next(iter(curves.values())).shape[1])
        ]
        + [{"pixels_deleted": "AOPC", **{key: round(score, 6) for key, score in scores.items()}}],
    )

    print(f"\nWrote to {os.path.abspath(out)}/:")
    print(f"  {paths['explanations']:<44} input and heatmaps per method (predicted / true label)")
    print(f"  {paths['conservation']:<44} sum of relevance vs logit per example")
    print(f"  {paths['flipping_png']:<44} deletion curves with AOPC per method and random order")
    print(f"  {paths['flipping_csv']:<44} the curves' numbers")
    sys.stdout.flush()
    return 0
