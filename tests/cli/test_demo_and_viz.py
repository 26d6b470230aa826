"""The demo's building blocks (determinism, pixel flipping, conservation check) and ``captum_graph.viz``."""
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from captum_graph import demo, viz  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return demo.load_digits_data(seed=0)


@pytest.fixture(scope="module")
def model(data):
    return demo.train_digits_model(data, epochs=1, seed=0, progress=False)


def test_training_is_deterministic_for_a_seed(data, model):
    again = demo.train_digits_model(data, epochs=1, seed=0, progress=False)
    other = demo.train_digits_model(data, epochs=1, seed=1, progress=False)
    for (name, p), q, r in zip(model.state_dict().items(), again.state_dict().values(), other.state_dict().values()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(model.state_dict().values(), other.state_dict().values()))
    assert not model.training and not again.training  # handed back in eval mode


def test_training_leaves_the_thread_count_alone(data):
    before = torch.get_num_threads()
    demo.train_digits_model(data, epochs=1, seed=0, progress=False)
    assert torch.get_num_threads() == before


def test_pixel_flipping_curve(data, model):
    images = data.test_images[:3]
    targets = model(images).argmax(1)
    relevance = torch.randn(3, 1, 8, 8)
    curves = demo.pixel_flipping(model, images, targets, relevance, step=4)
    assert curves.shape == (3, 17)  # 0, 4, ..., 64 pixels deleted
    with torch.no_grad():
        assert torch.allclose(curves[:, 0], model(images).gather(1, targets[:, None]).squeeze(1), atol=1e-5)
        blank = model(torch.zeros_like(images)).gather(1, targets[:, None]).squeeze(1)
    assert torch.allclose(curves[:, -1], blank, atol=1e-5)  # everything deleted, whatever the order
    # deleting the most relevant pixels first is deleting the least relevant last
    reverse = demo.pixel_flipping(model, images, targets, -relevance, step=64)
    assert torch.allclose(reverse, curves[:, [0, -1]], atol=1e-5)
    assert demo.aopc(curves) == pytest.approx((curves[:, :1] - curves).mean().item())


def test_conservation_is_exact_without_additive_constants(data, model):
    images = data.test_images[:4]
    targets = model(images).argmax(1)
    errors = demo.exact_conservation_check(model, images, targets)
    assert errors["captum_graph"] < 1e-4, errors
    assert model.stem[1].running_mean.abs().sum() > 0  # the model itself keeps its constants


def test_pick_examples_goes_round_the_classes(data):
    chosen = demo.pick_examples(data.test_labels, 12)
    assert data.test_labels[chosen].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]


def test_relevance_map_is_centred_at_zero():
    figure = viz.new_figure(1, 1)
    ax = figure.axes[0]
    relevance = torch.zeros(1, 6, 6)
    relevance[0, 0, 0], relevance[0, 5, 5] = 3.0, -1.0
    viz.relevance_map(relevance, ax)
    image = ax.get_images()[-1]
    low, high = image.get_clim()
    assert low == -high  # symmetric limits: white is zero
    assert image.get_cmap().name == viz.RELEVANCE_CMAP


def test_all_zero_maps_and_gradcam_overlays_draw(tmp_path):
    figure = viz.new_figure(1, 3)
    image = torch.rand(3, 16, 16)
    viz.relevance_map(torch.zeros(3, 16, 16), figure.axes[0], image)
    viz.gradcam_overlay(torch.zeros(1, 4, 4), image, figure.axes[1])
    viz.gradcam_overlay(torch.rand(1, 4, 4), image, figure.axes[2], title="Grad-CAM")
    assert figure.axes[2].get_images()[-1].get_array().shape == (16, 16)  # upsampled to the image
    path = viz.save_attribution_png(str(tmp_path / "map.png"), "relevance", torch.randn(3, 16, 16), image, "LRP")
    from PIL import Image

    with Image.open(path) as png:
        png.verify()


def test_to_hwc_rejects_other_shapes():
    with pytest.raises(ValueError, match="expected an image shaped"):
        viz.to_hwc(torch.zeros(2, 2, 3, 4, 5))
