"""The token grid of models whose patches are embedded by a linear layer on reshaped pixels.

No feature map holds their grid; ``LayerGradCam(model)`` reads it from the
reshape that cuts the image into patches, where the patches become tokens row
by row, and refuses a cut it cannot read that way.
"""
import pytest
import torch
from captum_graph.attr import LayerGradCam
from captum_graph.errors import LayerResolutionError
from torch import nn

PATCH = 4


class _LinearPatchViT(nn.Module):
    """Cut into 4x4 patches by reshapes, a linear embedding, a class token and one attention block.

    ``layout``: ``"rows"`` (``b c (h p) (w q) -> b (h w) (p q c)``), ``"channels last"`` (the image
    permuted to ``b h w c`` first) or ``"columns"`` (tokens column by column: ``b (w h) (p q c)``).
    """

    def __init__(self, layout: str) -> None:
        super().__init__()
        self.layout = layout
        self.embed = nn.Linear(3 * PATCH * PATCH, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, 8))
        self.norm = nn.LayerNorm(8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def _patches(self, x):
        n, c, height, width = x.shape
        h, w = height // PATCH, width // PATCH
        if self.layout == "channels last":
            cut = x.permute(0, 2, 3, 1).reshape(n, h, PATCH, w, PATCH, c).permute(0, 1, 3, 2, 4, 5)
        else:
            cut = x.reshape(n, c, h, PATCH, w, PATCH)
            cut = cut.permute(0, 4, 2, 3, 5, 1) if self.layout == "columns" else cut.permute(0, 2, 4, 3, 5, 1)
        return cut.reshape(n, h * w, -1)

    def forward(self, x):
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(self._patches(x))], dim=1)
        normed = self.norm(tokens)
        mixed = tokens + self.attn(normed, normed, normed, need_weights=False)[0]
        return self.head(mixed[:, 0])


def _grad_cam_by_hand(model: _LinearPatchViT, x: torch.Tensor, target: int) -> torch.Tensor:
    """Grad-CAM on the normalised patch tokens, read row by row."""
    store = {}
    handle = model.norm.register_forward_hook(lambda m, args, output: store.update(tokens=output))
    try:
        output = model(x)
    finally:
        handle.remove()
    (grads,) = torch.autograd.grad(output[:, target].sum(), store["tokens"])
    tokens, grads = store["tokens"][:, 1:], grads[:, 1:]
    h, w = x.shape[2] // PATCH, x.shape[3] // PATCH
    return (grads.mean(1, keepdim=True) * tokens).sum(-1).reshape(x.shape[0], 1, h, w).detach()


@pytest.mark.parametrize("layout", ["rows", "channels last"])
def test_grid_is_read_from_the_reshape_that_cuts_patches(layout, assert_untouched):
    torch.manual_seed(0)
    model = _LinearPatchViT(layout).double().eval()
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)  # a 4 x 6 grid: a transposed reading would show
    cam = LayerGradCam(model)
    with assert_untouched(model, x):
        found = cam.attribute(x, target=1)
    assert cam.layer_name == "norm"
    assert found.shape == (2, 1, 4, 6)
    torch.testing.assert_close(found, _grad_cam_by_hand(model, x, 1), rtol=1e-10, atol=1e-12)


def test_patches_taken_column_by_column_are_refused_not_misread():
    torch.manual_seed(0)
    model = _LinearPatchViT("columns").double().eval()
    with pytest.raises(LayerResolutionError, match="layer="):
        LayerGradCam(model).attribute(torch.randn(2, 3, 16, 24, dtype=torch.float64), target=1)
