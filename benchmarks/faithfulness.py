"""Faithfulness with ground truth: which explanation points at the evidence the model must use.

No pretrained ImageNet model can be had offline, so the tasks are built so that
the evidence is known:

* ``images``: an 8x8 scikit-learn digit, scaled up, pasted at a random place on
  a larger canvas of noise; a residual CNN with a concatenation and a
  squeeze-excitation gate (the operations plain Captum's LRP cannot see)
  classifies the digit. The evidence is the digit's box.
* ``text``: sequences of random tokens whose class is decided by trigger tokens
  at random positions, classified by a small transformer encoder. The evidence
  is the trigger tokens.

Both models are trained here, in well under a minute each on a CPU. Every
method explains the predicted class of held-out examples the model gets right,
and each map is scored by

* ``relevance_mass``: positive relevance inside the evidence over all positive
  relevance (Arras et al. 2022, CLEVR-XAI, "relevance mass accuracy");
* ``relevance_rank``: of the K most relevant features, K the evidence's size,
  the fraction inside it ("relevance rank accuracy", same paper);
* ``pointing_game``: whether the most relevant feature is in the evidence
  (Zhang et al. 2018);
* ``aopc``: area over the perturbation curve when the most relevant features
  are deleted first (Samek et al. 2017); ``random`` gives the curve of a
  random order to compare with.

The first three are Quantus's implementations (``quantus.RelevanceMassAccuracy``,
``RelevanceRankAccuracy``, ``PointingGame``) on positive relevance; AOPC is
computed here, since Quantus's region perturbation needs the model in its own
wrapper and perturbs patches of the input, where the text task perturbs tokens.

Run::

    .venv/bin/python benchmarks/faithfulness.py --quick      # under 3 minutes
    .venv/bin/python benchmarks/faithfulness.py --out results/   # results/faithfulness.csv and .png
"""
import argparse
import csv
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from captum_graph.demo import ResidualBlock, SqueezeExcitation, single_thread
from captum_graph.rules import PRESETS, with_input_bounds

METRICS = ("relevance_mass", "relevance_rank", "pointing_game", "aopc")
#: zennit's composite for each captum_graph preset that equals one (``lrp:<preset>`` and ``zennit:<name>``).
ZENNIT_COMPOSITES = {
    "epsilon-plus": "EpsilonPlus",
    "epsilon-plus-flat": "EpsilonPlusFlat",
    "epsilon-alpha2-beta1": "EpsilonAlpha2Beta1",
    "epsilon-alpha2-beta1-flat": "EpsilonAlpha2Beta1Flat",
    "epsilon-gamma-box": "EpsilonGammaBox",
}

Explain = Callable[[Tensor, Tensor], Tensor]


class Task(NamedTuple):
    """A trained model and held-out examples with their evidence.

    ``inputs`` are what the explainers attribute to (images, or token
    embeddings); ``evidence`` is a boolean mask shaped like one relevance map
    per example (``(N, H, W)`` or ``(N, T)``); ``delete`` returns the inputs
    with the features where ``mask`` is true removed.
    """

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    evidence: Tensor
    delete: Callable[[Tensor, Tensor], Tensor]
    methods: Dict[str, Explain]


# ---------------------------------------------------------------------------
# images: digits on a noisy canvas
# ---------------------------------------------------------------------------
class CanvasNet(nn.Module):
    """``stem -> pool -> residual block -> cat(1x1, 3x3) -> gate -> pool -> residual block -> mean -> linear``.

    The last feature map (``block2``'s output) is a quarter of the canvas's side.
    """

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.block1 = ResidualBlock(width)
        self.branch_a = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.branch_b = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.se = SqueezeExcitation(2 * width)
        self.block2 = ResidualBlock(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), 2)
        x = self.block1(x)
        x = F.relu(torch.cat([self.branch_a(x), self.branch_b(x)], dim=1))
        x = self.block2(F.max_pool2d(self.se(x), 2))
        return self.head(x.mean((2, 3)))


def canvas_digits(count: int, size: int, scale: int, noise: float, seed: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``count`` canvases ``(N, 1, size, size)`` in [0, 1], their labels and the digits' boxes as masks."""
    from sklearn.datasets import load_digits

    digits, labels = load_digits(return_X_y=True)
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randint(len(labels), (count,), generator=generator)
    glyphs = torch.tensor(digits, dtype=torch.float32)[chosen].reshape(count, 1, 8, 8) / 16.0
    glyphs = F.interpolate(glyphs, scale_factor=scale, mode="nearest")
    side = 8 * scale
    images = torch.rand(count, 1, size, size, generator=generator) * noise
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    rows = torch.randint(size - side + 1, (count,), generator=generator).tolist()
    cols = torch.randint(size - side + 1, (count,), generator=generator).tolist()
    for i, (r, c) in enumerate(zip(rows, cols)):
        window = images[i, :, r : r + side, c : c + side]
        images[i, :, r : r + side, c : c + side] = torch.maximum(window, glyphs[i])
        masks[i, r : r + side, c : c + side] = True
    return images, torch.tensor(labels)[chosen], masks


def train(model: nn.Module, inputs: Tensor, labels: Tensor, epochs: int, seed: int, batch_size: int = 64) -> nn.Module:
    """Adam with a cosine schedule; deterministic for ``seed``; returns the model in eval mode."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=order).split(batch_size):
            if len(batch) < 2:
                continue
            loss = F.cross_entropy(model(inputs[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def image_task(quick: bool, seed: int = 0) -> Task:
    """Digits (8x8, scaled 2x) on a 64x64 canvas of uniform noise; the evidence is the digit's box."""
    size, scale, noise = 64, 2, 0.35
    train_images, train_labels, _ = canvas_digits(3000 if quick else 8000, size, scale, noise, seed)
    test_images, test_labels, test_masks = canvas_digits(400, size, scale, noise, seed + 1)
    torch.manual_seed(seed)
    model = train(CanvasNet(), train_images, train_labels, epochs=4 if quick else 6, seed=seed)
    with torch.no_grad():
        predicted = model(test_images).argmax(1)
    correct = (predicted == test_labels).nonzero().flatten()[: 48 if quick else 200]
    print(f"images: test accuracy {(predicted == test_labels).double().mean().item():.1%}", flush=True)
    inputs, targets, evidence = test_images[correct], predicted[correct], test_masks[correct]

    def delete(images: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask[:, None], torch.zeros_like(images), images)

    return Task("images", model, inputs, targets, evidence, delete, image_methods(model, input_range=(0.0, 1.0)))


def image_methods(model: nn.Module, input_range: Tuple[float, float]) -> Dict[str, Explain]:
    """Every method that explains an image classifier, each returning ``(N, H, W)``."""
    from captum.attr import InputXGradient, IntegratedGradients

    from captum_graph.attr import LRP, GuidedGradCam, LayerGradCam

    methods: Dict[str, Explain] = {}
    for name in PRESETS:
        lrp = LRP(model, preset=_preset(name, input_range))
        methods[f"lrp:{name}"] = _channel_sum(_gradient_method(lrp))
    methods["input_x_gradient"] = _channel_sum(_gradient_method(InputXGradient(model)))
    integrated = IntegratedGradients(model)
    methods["integrated_gradients"] = _channel_sum(
        lambda x, t: integrated.attribute(x, baselines=torch.zeros_like(x), target=t, n_steps=32).detach()
    )
    cam = LayerGradCam(model)
    methods["gradcam"] = lambda x, t: _upsampled(cam.attribute(x, target=t, relu_attributions=True), x)

    def guided_gradcam(x: Tensor, t: Tensor) -> Tensor:
        if cam.layer_name is None:
            cam.attribute(x[:1], target=t[:1])  # the automatic layer is known after a call
        return GuidedGradCam(model, cam.layer_name).attribute(x, target=t).detach().sum(1)

    methods["guided_gradcam"] = guided_gradcam
    methods.update(_zennit_methods(model, input_range))
    pytorch_grad_cam = _pytorch_grad_cam(model, cam)
    if pytorch_grad_cam is not None:
        methods["pytorch_grad_cam:gradcam"] = pytorch_grad_cam
    methods["random"] = lambda x, t: torch.rand(x.shape[0], *x.shape[2:], generator=torch.Generator().manual_seed(0))
    return methods


def _preset(name: str, input_range: Tuple[float, float]):
    """The preset named ``name``, its box rule (if any) bounded by the input's range."""
    return with_input_bounds(name, *input_range)


def _gradient_method(method) -> Explain:
    return lambda x, t: method.attribute(x.detach().clone().requires_grad_(), target=t).detach()


def _channel_sum(explain: Explain) -> Explain:
    return lambda x, t: explain(x, t).sum(1)


def _upsampled(maps: Tensor, images: Tensor) -> Tensor:
    return F.interpolate(maps.detach().double(), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


def _zennit_methods(model: nn.Module, input_range: Tuple[float, float], per_channel: bool = False) -> Dict[str, Explain]:
    """zennit's composites equal to captum_graph's presets, with batch norms merged (its canonizer).

    The maps are summed over channels, or returned as they are with ``per_channel``.
    """
    try:
        from zennit import composites
        from zennit.attribution import Gradient
        from zennit.canonizers import SequentialMergeBatchNorm
    except ImportError:
        return {}

    def method(composite_name: str) -> Explain:
        def explain(x: Tensor, t: Tensor) -> Tensor:
            kind = getattr(composites, composite_name)
            canonizers = [SequentialMergeBatchNorm()]
            if composite_name == "EpsilonGammaBox":
                composite = kind(low=input_range[0], high=input_range[1], canonizers=canonizers)
            else:
                composite = kind(canonizers=canonizers)
            with torch.no_grad():
                classes = model(x[:1]).shape[1]
            with Gradient(model=model, composite=composite) as attributor:
                _, relevance = attributor(x.detach(), torch.eye(classes)[t])
            return relevance.detach() if per_channel else relevance.detach().sum(1)

        return explain

    return {f"zennit:{name}": method(name) for preset, name in ZENNIT_COMPOSITES.items() if preset in PRESETS}


def _pytorch_grad_cam(model: nn.Module, cam) -> Optional[Explain]:
    """pytorch-grad-cam's GradCAM on ``block2``, the module whose output is captum_graph's automatic layer."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        return None

    def explain(x: Tensor, t: Tensor) -> Tensor:
        with GradCAM(model=model, target_layers=[model.block2]) as grad_cam:
            maps = grad_cam(input_tensor=x.detach(), targets=[ClassifierOutputTarget(int(c)) for c in t])
        return torch.as_tensor(maps, dtype=torch.float64)

    return explain


# ---------------------------------------------------------------------------
# text: trigger words decide the class
# ---------------------------------------------------------------------------
def text_task(quick: bool, seed: int = 0) -> Task:
    """Sentences of 12 filler words, class 1 iff a trigger word appears; the evidence is the triggers.

    The classifier is captum_graph's tiny trained BERT (:mod:`captum_graph.synthetic_text`),
    explained at its word embeddings; all sentences have one length, so none is padded.
    A deleted token's embedding becomes that of ``[UNK]``.
    """
    from captum_graph.synthetic_text import TriggerTask, train_trigger_classifier
    from captum_graph.text import LogitsFromEmbeddings

    task = TriggerTask(min_words=12, max_words=12)
    trained = train_trigger_classifier(task, seed=seed, steps=150 if quick else 300)
    print(f"text: test accuracy {trained.accuracy:.1%}, trained in {trained.seconds:.0f} s", flush=True)
    texts, labels = task.sample(400, seed=seed + 1)
    ids = trained.tokenizer(texts, return_tensors="pt")["input_ids"]
    embedding = trained.model.get_input_embeddings()
    model = LogitsFromEmbeddings(trained.model).eval()
    with torch.no_grad():
        inputs = embedding(ids)
        predicted = model(inputs).argmax(1)
    chosen = ((predicted == labels) & (labels == 1)).nonzero().flatten()[: 48 if quick else 150]
    tokens = [trained.tokenizer.convert_ids_to_tokens(row.tolist()) for row in ids[chosen]]
    evidence = torch.stack([task.is_trigger(row) for row in tokens])
    unknown = embedding.weight[trained.tokenizer.convert_tokens_to_ids("[UNK]")].detach()

    def delete(embeddings: Tensor, mask: Tensor) -> Tensor:
        return torch.where(mask[..., None], unknown.expand_as(embeddings), embeddings)

    inputs = inputs[chosen]
    return Task("text", model, inputs, predicted[chosen], evidence, delete, text_methods(model, unknown))


def text_methods(model: nn.Module, unknown: Tensor) -> Dict[str, Explain]:
    """Every method that explains a text classifier at its embeddings, each returning ``(N, T)``."""
    from captum.attr import InputXGradient, IntegratedGradients

    from captum_graph.attr import LRP

    methods: Dict[str, Explain] = {}
    for name in PRESETS:
        methods[f"lrp:{name}"] = _token_sum(_gradient_method(LRP(model, preset=_preset(name, (-1.0, 1.0)))))
    methods["input_x_gradient"] = _token_sum(_gradient_method(InputXGradient(model)))
    integrated = IntegratedGradients(model)
    methods["integrated_gradients"] = _token_sum(
        lambda x, t: integrated.attribute(x, baselines=unknown.expand_as(x), target=t, n_steps=32).detach()
    )
    methods["gradcam"] = _token_gradcam(model, model.model.base_model.encoder.layer[-1])
    methods.update({name: _token_sum(explain) for name, explain in _zennit_methods(model, (-1.0, 1.0), per_channel=True).items()})
    methods["random"] = lambda x, t: torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(0))
    return methods


def _token_gradcam(model: nn.Module, layer: nn.Module) -> Explain:
    """Grad-CAM over tokens at ``layer``'s output ``(N, T, hidden)``: hidden units are the channels.

    ``relu(sum_c mean_t(dy/dA_tc) A_tc)`` per token, as Grad-CAM on a ViT's last
    block. captum_graph's automatic layer is a spatial feature map, which a
    text model does not have (``LayerGradCam(model)`` says so), and Captum's
    ``LayerGradCam`` takes dimension 1 of a layer's output as its channels.
    """

    def explain(x: Tensor, t: Tensor) -> Tensor:
        outputs = []
        handle = layer.register_forward_hook(lambda module, args, out: outputs.append(out[0] if isinstance(out, tuple) else out))
        try:
            with torch.enable_grad():
                logits = model(x.detach())
                (gradient,) = torch.autograd.grad(logits.gather(1, t[:, None]).sum(), outputs[0])
        finally:
            handle.remove()
        weights = gradient.mean(1, keepdim=True)
        return F.relu((weights * outputs[0]).sum(-1)).detach()

    return explain


def _token_sum(explain: Explain) -> Explain:
    return lambda x, t: explain(x, t).sum(-1)


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------
def localisation(relevance: Tensor, evidence: Tensor) -> Dict[str, float]:
    """Quantus's relevance mass, relevance rank and pointing game on positive relevance, averaged."""
    import quantus

    positive = relevance.double().clamp(min=0).numpy()[:, None]
    masks = evidence.numpy()[:, None].astype(float)
    inputs, classes = np.zeros_like(positive), np.zeros(len(positive))  # read for their shapes only
    common = dict(abs=False, normalise=False, disable_warnings=True)
    scores = {
        "relevance_mass": quantus.RelevanceMassAccuracy(**common),
        "relevance_rank": quantus.RelevanceRankAccuracy(**common),
        "pointing_game": quantus.PointingGame(**common),
    }
    results = {}
    for name, metric in scores.items():
        values = np.asarray(metric(model=None, x_batch=inputs, y_batch=classes, a_batch=positive, s_batch=masks, channel_first=True), dtype=float)
        results[name] = float(np.nanmean(values)) if not np.all(np.isnan(values)) else 0.0
    return results


def deletion_aopc(task: Task, relevance: Tensor, fraction: float, points: int) -> float:
    """AOPC over deleting the most relevant ``fraction`` of the features in ``points`` steps.

    ``f(x) - f(x_k)`` of the target logit, averaged over the steps and the examples.
    """
    n = relevance.shape[0]
    flat = relevance.reshape(n, -1).double()
    features = flat.shape[1]
    counts = torch.linspace(0, fraction * features, points).round().long()
    order = flat.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(features).expand(n, features))
    with torch.no_grad():
        logits = []
        for count in counts:
            mask = (rank < count).reshape(relevance.shape)
            output = task.model(task.delete(task.inputs, mask))
            logits.append(output.gather(1, task.targets[:, None])[:, 0])
    curve = torch.stack(logits, 1)
    return (curve[:, :1] - curve).mean().item()


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------
@dataclass
class Result:
    task: str
    method: str
    metric: str
    value: float


def evaluate(task: Task, fraction: float, points: int) -> Tuple[List[Result], Dict[str, Tensor]]:
    """Every method of ``task`` on its examples: the scores and the maps."""
    results, maps = [], {}
    for method, explain in task.methods.items():
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                relevance = explain(task.inputs, task.targets).detach().double()
        except Exception as error:  # noqa: BLE001 - a method that cannot run is reported, not fatal
            print(f"  {task.name} {method}: fails ({type(error).__name__}: {str(error).splitlines()[0][:100]})", flush=True)
            continue
        if not torch.isfinite(relevance).all():
            print(f"  {task.name} {method}: non-finite relevance, left out", flush=True)
            continue
        maps[method] = relevance
        scores = localisation(relevance, task.evidence)
        scores["aopc"] = deletion_aopc(task, relevance, fraction, points)
        results += [Result(task.name, method, metric, scores[metric]) for metric in METRICS]
        print(f"  {task.name} {method}: {time.perf_counter() - started:.1f} s", flush=True)
    return results, maps


def table(results: Sequence[Result]) -> str:
    """Markdown: one row per task and method, one column per metric."""
    lines = ["| task | method | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    rows: Dict[Tuple[str, str], Dict[str, float]] = {}
    for r in results:
        rows.setdefault((r.task, r.method), {})[r.metric] = r.value
    for (task, method), values in rows.items():
        lines.append(f"| {task} | {method} | " + " | ".join(f"{values[m]:.3f}" for m in METRICS) + " |")
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["task", "method", "metric", "value"])
        for r in results:
            writer.writerow([r.task, r.method, r.metric, f"{r.value:.6g}"])


def figure(task: Task, maps: Dict[str, Tensor], path: str, examples: int = 4) -> None:
    """Each method's heatmaps on the first ``examples`` images, the evidence box drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    methods = list(maps)
    fig, axes = plt.subplots(examples, len(methods) + 1, figsize=(1.6 * (len(methods) + 1), 1.7 * examples))
    for row in range(examples):
        box = task.evidence[row].nonzero()
        (top, left), (bottom, right) = box.min(0).values.tolist(), box.max(0).values.tolist()
        panels = [("input", task.inputs[row, 0], "gray", None)] + [
            (m, maps[m][row], "bwr", float(maps[m][row].abs().max()) or 1.0) for m in methods
        ]
        for col, (title, image, cmap, limit) in enumerate(panels):
            ax = axes[row, col]
            kwargs = {} if limit is None else {"vmin": -limit, "vmax": limit}
            ax.imshow(image.numpy(), cmap=cmap, **kwargs)
            ax.add_patch(Rectangle((left - 0.5, top - 0.5), right - left + 1, bottom - top + 1, fill=False, edgecolor="lime", linewidth=1))
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller training sets and fewer examples (under 3 minutes)")
    parser.add_argument("--out", help="write DIR/faithfulness.csv and DIR/faithfulness_images.png")
    parser.add_argument("--tasks", nargs="+", default=["images", "text"], choices=["images", "text"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: List[Result] = []
    builders = {"images": image_task, "text": text_task}
    with single_thread():
        for name in args.tasks:
            if name not in builders:
                print(f"{name}: not available", flush=True)
                continue
            task = builders[name](args.quick, args.seed)
            task_results, maps = evaluate(task, fraction=0.1, points=11 if args.quick else 21)
            results += task_results
            if args.out and name == "images":
                os.makedirs(args.out, exist_ok=True)
                figure(task, maps, os.path.join(args.out, "faithfulness_images.png"))
    print(table(results))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(results, os.path.join(args.out, "faithfulness.csv"))
    print(f"total {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
