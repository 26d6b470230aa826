"""Pixel flipping: delete the most relevant pixels first and watch the explained output fall.

A faithful explanation ranks first the pixels the model needs, so deleting
them in that order makes the target output drop fast. The area over the
perturbation curve (AOPC, Samek et al., 2017, "Evaluating the visualization of
what a deep neural network has learned") condenses each curve to one number:
higher is more faithful. Deleting pixels in random order is the reference.

Used by the demo (``captum-graph demo``) and by dataset-scale evaluation
(:func:`captum_graph.dataset.evaluate_dataset`).
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pixel_flipping", "random_pixel_flipping", "aopc", "aopc_per_example"]


def _deletion_counts(pixels: int, step: int, points: Optional[int], device: torch.device) -> Tensor:
    if points is not None:
        return torch.round(torch.arange(points + 1, device=device, dtype=torch.float64) * pixels / points).long()
    return torch.arange(0, pixels + step, step, device=device).clamp(max=pixels)


def _ranking_at(ranking: Tensor, height: int, width: int) -> Tensor:
    """``(N, H, W)``: channels summed; a coarser map (Grad-CAM's) resized bilinearly to the image."""
    summed = ranking.sum(1, keepdim=True)
    if tuple(summed.shape[-2:]) != (height, width):
        summed = F.interpolate(summed.double(), size=(height, width), mode="bilinear", align_corners=False)
    return summed[:, 0]


@torch.no_grad()
def pixel_flipping(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    ranking: Tensor,
    step: int = 4,
    baseline: float = 0.0,
    points: Optional[int] = None,
    max_batch: int = 1024,
) -> Tensor:
    """Deletion curve: the target logit as pixels are set to ``baseline``, highest ``ranking`` first.

    ``step`` pixels are deleted between two points of the curve; channels are
    summed for the ranking and deleted together. Ties keep the pixel order.

    Args:
        model: the classifier (its mode is left as it is).
        images: ``(N, C, H, W)``.
        targets: ``(N,)`` the classes whose logits are tracked.
        ranking: ``(N, C, H, W)`` or ``(N, 1, h, w)``, e.g. an attribution; a map
            coarser than the image (Grad-CAM's) is resized to it bilinearly.
        step: pixels deleted per point.
        baseline: the value a deleted pixel gets (0: the digits' background, or
            the mean colour of normalised images).
        points: if given, replaces ``step``: the curve has ``points + 1``
            entries, the k-th after deleting ``round(k * H * W / points)``
            pixels, whatever the image size.
        max_batch: most perturbed images per forward pass.

    Returns:
        ``(N, K + 1)``: the logit after deleting 0, step, 2 step, ..., all pixels.
    """
    n, channels, height, width = images.shape
    pixels = height * width
    device = images.device
    counts = _deletion_counts(pixels, step, points, device)
    order = _ranking_at(ranking.to(device), height, width).reshape(n, pixels).sort(dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(pixels, device=device).expand(n, pixels))
    deleted = rank[:, None, :] < counts[None, :, None]  # (N, points, pixels)
    flat = images.reshape(n, 1, channels, pixels)
    perturbed = torch.where(deleted[:, :, None, :], torch.full_like(flat, baseline), flat)
    batch = perturbed.reshape(n * len(counts), channels, height, width)
    logits = torch.cat([model(chunk) for chunk in batch.split(max_batch)])
    steps = len(counts)
    return logits.reshape(n, steps, -1).gather(2, targets.to(device)[:, None, None].expand(n, steps, 1)).squeeze(2)


def random_pixel_flipping(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    repeats: int = 4,
    seed: int = 0,
    step: int = 4,
    baseline: float = 0.0,
    points: Optional[int] = None,
    max_batch: int = 1024,
) -> Tensor:
    """:func:`pixel_flipping` in random order, averaged over ``repeats`` orders: the baseline.

    The orders are drawn on the CPU from ``seed``, so they do not depend on the device.
    """
    generator = torch.Generator().manual_seed(seed)
    n, _, height, width = images.shape
    curves = [
        pixel_flipping(
            model, images, targets, torch.rand(n, 1, height, width, generator=generator), step, baseline, points, max_batch
        )
        for _ in range(repeats)
    ]
    return torch.stack(curves).mean(0)


def aopc_per_example(curves: Tensor) -> Tensor:
    """``(N,)``: each curve's mean over steps of f(x) - f(x_k)."""
    return (curves[:, :1] - curves).mean(1)


def aopc(curves: Tensor) -> float:
    """Area over the perturbation curve (Samek et al., 2017): mean over steps and examples of f(x) - f(x_k).

    Higher is better: the deleted pixels mattered to the model.
    """
    return (curves[:, :1] - curves).mean().item()
