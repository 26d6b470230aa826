"""Pictures of attributions: signed relevance maps and Grad-CAM overlays.

Drawing is delegated to Captum's ``visualization.visualize_image_attr``
(``from captum.attr import visualization``)
(normalisation by an outlier percentile, the colour limits, the blending with
a greyscale copy of the image); this module only chooses what Captum leaves
open:

* relevance (LRP, InputXGradient, ...) is signed, so it is drawn with a
  diverging colormap and symmetric limits: white is exactly zero;
* Grad-CAM is a coarse, non-negative map, so it is upsampled to the image and
  laid over it.

matplotlib is imported only when something is drawn (it comes with the
``demo`` extra: ``pip install 'captum_graph[demo]'``). Figures are built with
:class:`matplotlib.figure.Figure`, without pyplot, so nothing here depends on
a display or changes pyplot's state.

Examples::

    >>> from captum_graph import viz
    >>> fig = viz.new_figure(1, 2)
    >>> viz.show_image(image, fig.axes[0], title="input")
    >>> viz.relevance_map(relevance, fig.axes[1], title="LRP")
    >>> fig.savefig("lrp.png")
"""
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RELEVANCE_CMAP",
    "GRADCAM_CMAP",
    "require_matplotlib",
    "new_figure",
    "to_hwc",
    "show_image",
    "relevance_map",
    "gradcam_overlay",
    "attribution_map",
    "save_attribution_png",
]

#: Diverging colormap for signed relevance: blue negative, white zero, red positive.
RELEVANCE_CMAP = "bwr"
#: Sequential colormap for Grad-CAM, the customary one.
GRADCAM_CMAP = "jet"

ArrayLike = Union[Tensor, np.ndarray]


def require_matplotlib() -> Any:
    """Import matplotlib, or raise an ``ImportError`` that says how to install it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "drawing attributions needs matplotlib: pip install matplotlib (or pip install 'captum_graph[demo]')"
        ) from error
    return matplotlib


def _visualize_image_attr() -> Any:
    require_matplotlib()
    # Captum's module imports pyplot; with no display, matplotlib falls back to Agg by itself.
    from captum.attr import visualization

    return visualization.visualize_image_attr


def new_figure(rows: int, cols: int, cell_size: float = 2.0, **subplot_kwargs: Any) -> Any:
    """A pyplot-free :class:`~matplotlib.figure.Figure` with a ``rows x cols`` grid of axes.

    The axes are in ``figure.axes``, row by row. Save with ``figure.savefig(path)``.
    """
    require_matplotlib()
    from matplotlib.figure import Figure

    figure = Figure(figsize=(cell_size * cols, cell_size * rows), layout="constrained")
    figure.subplots(rows, cols, squeeze=False, **subplot_kwargs)
    return figure


def to_hwc(image: ArrayLike) -> np.ndarray:
    """An image or attribution as a float ``(H, W, C)`` numpy array.

    Accepts ``(H, W)``, ``(C, H, W)`` and ``(1, C, H, W)`` tensors or arrays
    (channels first, as in PyTorch).
    """
    array = image.detach().cpu().double().numpy() if isinstance(image, Tensor) else np.asarray(image, dtype=float)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim != 3:
        raise ValueError(f"expected an image shaped (H, W), (C, H, W) or (1, C, H, W), got {array.shape}")
    return np.transpose(array, (1, 2, 0))


def _spatial_size(image: ArrayLike) -> Tuple[int, int]:
    return tuple(to_hwc(image).shape[:2])  # type: ignore[return-value]


def _finish(ax: Any, title: Optional[str]) -> Any:
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize="small")
    return ax


def show_image(image: ArrayLike, ax: Any, title: Optional[str] = None) -> Any:
    """Draw an image (grey if it has one channel), scaled to its own range."""
    array = to_hwc(image)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) if high > low else np.zeros_like(array)
    if scaled.shape[2] == 1:
        ax.imshow(scaled[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(scaled[:, :, :3])
    return _finish(ax, title)


def _draw(
    attribution: np.ndarray,
    ax: Any,
    image: Optional[np.ndarray],
    sign: str,
    cmap: str,
    alpha: float,
    outlier_perc: float,
    title: Optional[str],
) -> Any:
    peak = float(np.abs(attribution.sum(axis=2)).max())
    if peak == 0.0 or not np.isfinite(peak):
        # Captum cannot normalise an all-zero map (it asserts); draw it as the zero colour.
        limits = (-1.0, 1.0) if sign == "all" else (0.0, 1.0)
        if image is not None:
            ax.imshow(image.mean(axis=2), cmap="gray")
        ax.imshow(np.zeros(attribution.shape[:2]), cmap=cmap, vmin=limits[0], vmax=limits[1], alpha=alpha if image is not None else 1.0)
        return _finish(ax, title)
    visualize = _visualize_image_attr()
    # Captum's scaling is relative; scaling to 1 first avoids its "normalising by ~0" warning for tiny maps.
    visualize(
        attribution / peak,
        original_image=image,
        method="blended_heat_map" if image is not None else "heat_map",
        sign=sign,
        plt_fig_axis=(ax.figure, ax),
        outlier_perc=outlier_perc,
        cmap=cmap,
        alpha_overlay=alpha,
        use_pyplot=False,
    )
    return _finish(ax, title)


def relevance_map(
    relevance: ArrayLike,
    ax: Any,
    image: Optional[ArrayLike] = None,
    *,
    title: Optional[str] = None,
    cmap: str = RELEVANCE_CMAP,
    outlier_perc: float = 1.0,
    alpha: float = 0.7,
) -> Any:
    """Draw signed relevance with a diverging colormap centred at zero.

    Channels are summed. Values are scaled by the largest magnitude left after
    clipping the top ``outlier_perc`` percent (of the total), so the colour
    limits are symmetric, ``[-s, s]``: white is zero, red positive, blue
    negative. With ``image`` the map is blended over a greyscale copy of it.

    Args:
        relevance: ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.
        ax: the matplotlib axes to draw on.
        image: optional image of the same height and width.
        title, cmap, outlier_perc, alpha: as in
            :func:`captum.attr.visualization.visualize_image_attr`.

    Returns:
        The axes.
    """
    attribution = to_hwc(relevance)
    background = _background(image, attribution.shape[:2])
    return _draw(attribution, ax, background, "all", cmap, alpha, outlier_perc, title)


def gradcam_overlay(
    cam: ArrayLike,
    image: ArrayLike,
    ax: Any,
    *,
    title: Optional[str] = None,
    cmap: str = GRADCAM_CMAP,
    alpha: float = 0.5,
) -> Any:
    """Draw a Grad-CAM map over ``image``, upsampled (bilinear) to the image's size.

    Negative values are dropped (Grad-CAM's ReLU), so a map computed with
    ``relu_attributions=False`` shows the same picture.

    Args:
        cam: ``(h, w)``, ``(1, h, w)`` or ``(1, 1, h, w)``; any resolution.
        image: ``(H, W)``, ``(C, H, W)`` or ``(1, C, H, W)``.
        ax: the matplotlib axes to draw on.

    Returns:
        The axes.
    """
    height, width = _spatial_size(image)
    upsampled = upsample(cam, (height, width)).clamp(min=0)
    return _draw(to_hwc(upsampled), ax, _background(image, (height, width)), "positive", cmap, alpha, 0.01, title)  # ~ scaled to the maximum


def upsample(cam: ArrayLike, size: Sequence[int]) -> Tensor:
    """A coarse map (``(h, w)``, ``(C, h, w)`` or ``(1, C, h, w)``) resized bilinearly to ``(1, H, W)``."""
    tensor = torch.as_tensor(cam).detach().cpu().double()
    while tensor.dim() < 4:
        tensor = tensor.unsqueeze(0)
    tensor = tensor.sum(1, keepdim=True)
    if tuple(tensor.shape[-2:]) != tuple(size):
        tensor = F.interpolate(tensor, size=tuple(size), mode="bilinear", align_corners=False)
    return tensor[0]


def attribution_map(kind: str, attribution: ArrayLike, image: ArrayLike, ax: Any, title: Optional[str] = None) -> Any:
    """``gradcam_overlay`` for ``kind == "gradcam"``, else ``relevance_map`` over the image."""
    if kind == "gradcam":
        return gradcam_overlay(attribution, image, ax, title=title)
    return relevance_map(attribution, ax, image, title=title)


def save_attribution_png(
    path: str,
    kind: str,
    attribution: ArrayLike,
    image: ArrayLike,
    title: Optional[str] = None,
    dpi: int = 100,
) -> str:
    """Write a two-panel PNG: the image, and the attribution laid over it.

    Args:
        path: where to write.
        kind: ``"gradcam"`` for a Grad-CAM map, anything else for signed relevance.
        attribution: the map (see :func:`relevance_map` and :func:`gradcam_overlay`).
        image: the image the model saw, before normalisation, channels first.
        title: shown over the attribution panel.

    Returns:
        ``path``.
    """
    figure = new_figure(1, 2, cell_size=3.0)
    show_image(image, figure.axes[0], title="input")
    attribution_map(kind, attribution, image, figure.axes[1], title=title)
    figure.savefig(path, dpi=dpi)
    return path


def _background(image: Optional[ArrayLike], size: Tuple[int, ...]) -> Optional[np.ndarray]:
    if image is None:
        return None
    array = to_hwc(image)
    if array.shape[:2] != tuple(size):
        raise ValueError(f"image is {array.shape[:2]} but the attribution is {tuple(size)}")
    low, high = float(array.min()), float(array.max())
    return (array - low) / (high - low) if high > low else np.zeros_like(array)
