"""``captum-graph`` through :func:`captum_graph.cli.main`, in-process: every bad input, help, options.

``python -m captum_graph`` calls the same ``main()``; running it in-process
spares an interpreter start-up (about 7 s) per case. Every bad input must
give one line on stderr, exit code 2 and no traceback; ``test_cli.py`` checks
one of them end to end in a subprocess.
"""
import pytest
import torch
import torchvision

pytest.importorskip("PIL")
pytest.importorskip("matplotlib")
from PIL import Image  # noqa: E402

from captum_graph.cli import main  # noqa: E402

MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=5):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.fc((y + y).mean((2, 3)))


def make(num_classes=5):
    return Net(num_classes)


def broken():
    raise RuntimeError("factory exploded\\nsecond line")


def not_a_model():
    return 42


class Picky(nn.Module):
    def forward(self, x):
        if x.shape[-1] != 224:
            raise ValueError(f"expected 224 pixels, got {x.shape[-1]}")
        return x.flatten(1)[:, :10]


def picky():
    return Picky()
'''


@pytest.fixture(scope="module")
def shared_files(tmp_path_factory):
    """Images, weight files and a model file for the cases below (built once: resnet18 weights take a while)."""
    tmp_path = tmp_path_factory.mktemp("cli_inputs")
    Image.new("RGB", (20, 24), (120, 30, 200)).save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    (tmp_path / "text.jpg").write_text("plain text")
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "resnet18_10.pt")
    renamed = {f"backbone.{k}": v for k, v in torchvision.models.resnet18().state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    torch.save({"epoch": 3, "note": "no tensors"}, tmp_path / "not_state_dict.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a checkpoint")
    torch.save(torchvision.models.resnet18(), tmp_path / "pickled_model.pt")  # a whole module: refused by weights_only
    (tmp_path / "models.py").write_text(MODEL_FILE)
    (tmp_path / "a_file").write_text("a file, not a directory")
    return tmp_path


@pytest.fixture
def files(shared_files, tmp_path):
    """The shared inputs linked into a fresh ``tmp_path``, so each test writes its own ``out``."""
    for path in shared_files.iterdir():
        (tmp_path / path.name).symlink_to(path)
    return tmp_path


def run(capsys, *args):
    """``main(args)``: (exit code, stdout, the stderr lines)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


EXPLAIN = ("explain", "torchvision:resnet18", "--size", "32")

CASES = {
    # name: (arguments after `explain MODEL --size 32` unless the first is a model spec, expected message)
    "missing image": (["--image", "{d}/nope.png", "--out", "{d}/out"], "image not found: {d}/nope.png"),
    "unreadable image": (["--image", "{d}/ok.png", "{d}/broken.png", "--out", "{d}/out"], "cannot read image {d}/broken.png"),
    "text file as image": (["--image", "{d}/text.jpg", "--out", "{d}/out"], "cannot read image {d}/text.jpg"),
    "unknown torchvision model": (
        ["torchvision:resnet_nine_thousand", "--image", "{d}/ok.png", "--out", "{d}/out"],
        "unknown torchvision model 'resnet_nine_thousand'",
    ),
    "builder without num_classes": (
        ["torchvision:raft_small", "--num-classes", "3", "--image", "{d}/ok.png", "--out", "{d}/out"],
        "could not build torchvision model 'raft_small': TypeError",
    ),
    "model fails on the input size": (
        ["{d}/models.py:picky", "--method", "ixg", "--image", "{d}/ok.png", "--out", "{d}/out"],
        "the model failed on 32x32 images (see --size): ValueError: expected 224 pixels, got 32",
    ),
    "malformed model spec": (["resnet18", "--image", "{d}/ok.png", "--out", "{d}/out"], "model must look like torchvision:NAME"),
    "missing model file": (["{d}/nope.py:make", "--image", "{d}/ok.png", "--out", "{d}/out"], "model file not found: {d}/nope.py"),
    "missing factory": (["{d}/models.py:nothing", "--image", "{d}/ok.png", "--out", "{d}/out"], "has no callable 'nothing'"),
    "failing factory": (["{d}/models.py:broken", "--image", "{d}/ok.png", "--out", "{d}/out"], "broken() failed: RuntimeError: factory exploded"),
    "factory without a module": (["{d}/models.py:not_a_model", "--image", "{d}/ok.png", "--out", "{d}/out"], "returned int, not a torch.nn.Module"),
    "missing weights file": (["--weights", "{d}/nope.pt", "--image", "{d}/ok.png", "--out", "{d}/out"], "weights file not found: {d}/nope.pt"),
    "garbage weights file": (["--weights", "{d}/garbage.pt", "--image", "{d}/ok.png", "--out", "{d}/out"], "cannot load weights from {d}/garbage.pt"),
    "pickled model, not weights": (["--weights", "{d}/pickled_model.pt", "--image", "{d}/ok.png", "--out", "{d}/out"], "readable with weights_only=True"),
    "dict without tensors": (["--weights", "{d}/not_state_dict.pt", "--image", "{d}/ok.png", "--out", "{d}/out"], "holds a dict, not a state_dict"),
    "tensor, not a dict": (["--weights", "{d}/tensor.pt", "--image", "{d}/ok.png", "--out", "{d}/out"], "holds a Tensor, not a state_dict"),
    "state_dict with wrong shapes": (
        ["--weights", "{d}/resnet18_10.pt", "--image", "{d}/ok.png", "--out", "{d}/out"],
        "do not fit ResNet: shape mismatch: fc.weight (file (10, 512), model (1000, 512))",
    ),
    "state_dict with other keys": (
        ["--weights", "{d}/renamed.pt", "--image", "{d}/ok.png", "--out", "{d}/out"],
        "missing keys: conv1.weight, bn1.weight",
    ),
    "target out of range": (["--image", "{d}/ok.png", "--target", "1000", "--out", "{d}/out"], "target 1000 is out of range: the model has 1000 outputs (0..999)"),
    "negative target": (["--image", "{d}/ok.png", "--target", "-1", "--out", "{d}/out"], "target -1 is out of range"),
    "target not a number": (["--image", "{d}/ok.png", "--target", "cat", "--out", "{d}/out"], "--target must be 'auto' or a class index, got 'cat'"),
    "output under a file": (["--image", "{d}/ok.png", "--out", "{d}/a_file/sub"], "output directory {d}/a_file/sub is not writable"),
    "output is a file": (["--image", "{d}/ok.png", "--out", "{d}/a_file"], "output directory {d}/a_file is not writable"),
    "unknown method": (["--image", "{d}/ok.png", "--method", "lrp,shap", "--out", "{d}/out"], "unknown method 'shap'; choose from lrp, gradcam, ixg"),
    "unknown preset": (["--image", "{d}/ok.png", "--preset", "alpha-beta", "--out", "{d}/out"], "unknown preset 'alpha-beta'"),
    "unknown Grad-CAM layer": (["--image", "{d}/ok.png", "--method", "gradcam", "--layer", "layer9", "--out", "{d}/out"], "layer9"),
    "wrong number of means": (["--image", "{d}/ok.png", "--mean", "0.5", "0.5", "--out", "{d}/out"], "--mean and --std take 1 or 3 values"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_and_exit_code_2(files, capsys, name):
    args, message = CASES[name]
    d = str(files)
    args = [a.format(d=d) for a in args]
    # a case that names its own model puts it first
    argv = [*EXPLAIN, *args] if args[0].startswith("--") else ["explain", args[0], "--size", "32", *args[1:]]
    code, out, err = run(capsys, *argv)
    assert code == 2, (code, out, err)
    assert len(err) == 1, err
    assert err[0].startswith("captum-graph: error: "), err
    assert message.format(d=d) in err[0], err
    assert "Traceback" not in err[0]


def test_no_partial_output_for_a_bad_image_among_good_ones(files, capsys):
    code, _, _ = run(capsys, *EXPLAIN, "--image", files / "ok.png", files / "broken.png", "--out", files / "out")
    assert code == 2
    assert not (files / "out").exists() or not list((files / "out").glob("*.png"))


def test_argparse_errors_are_one_line_too(files, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["explain", "torchvision:resnet18", "--image", str(files / "ok.png")])  # no --out
    assert stopped.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "the following arguments are required: --out" in err[0], err
    assert "captum-graph explain --help" in err[0]


def test_weights_that_fit_load(files, capsys):
    code, out, err = run(
        capsys, *EXPLAIN, "--num-classes", "10", "--weights", files / "resnet18_10.pt", "--image", files / "ok.png",
        "--method", "gradcam", "--target", "9", "--out", files / "out",
    )
    assert code == 0, err
    assert (files / "out" / "ok_gradcam.png").is_file()
    assert "class 9" in out


def test_model_from_a_python_file(files, capsys):
    code, out, err = run(capsys, "explain", f"{files}/models.py:make", "--size", "16", "--image", files / "ok.png",
                         "--method", "lrp,ixg", "--out", files / "out")
    assert code == 0, err
    assert sorted(p.name for p in (files / "out").iterdir()) == ["ok_ixg.png", "ok_lrp.png"]


def test_same_file_names_in_two_folders_do_not_overwrite(files, capsys):
    (files / "other").mkdir()
    Image.new("RGB", (20, 20), (0, 90, 0)).save(files / "other" / "ok.png")
    code, _, err = run(capsys, "explain", f"{files}/models.py:make", "--size", "16", "--image", files / "ok.png",
                       files / "other" / "ok.png", "--method", "ixg", "--out", files / "out")
    assert code == 0, err
    assert sorted(p.name for p in (files / "out").iterdir()) == ["000_ok_ixg.png", "001_ok_ixg.png"]


def test_help_reads_well(capsys):
    for argv, expected in (
        (["--help"], ["demo", "inspect", "explain", "examples:"]),
        (["explain", "--help"], ["--image PATH", "--method", "lrp, gradcam or ixg", "--target", "--weights",
                                 "weights_only=True", "--size", "--mean", "--std", "ImageNet", "--out DIR"]),
        (["demo", "--help"], ["--out DIR", "--seed", "--fast", "captum_graph_demo/"]),
        (["inspect", "--help"], ["MODEL", "--json", "--preset"]),
    ):
        with pytest.raises(SystemExit) as stopped:
            main(argv)
        assert stopped.value.code == 0
        text = capsys.readouterr().out
        for piece in expected:
            assert piece in text, (argv, piece)
        assert "(default: None)" not in text
        assert max(len(line) for line in text.splitlines()) <= 120


def test_inspect_prints_the_report(capsys):
    code, out, err = run(capsys, "inspect", "torchvision:resnet18")
    assert code == 0, err
    assert "Model: ResNet" in out
    assert "layer1.0.add" in out  # a functional addition rewritten into a module
    assert "Automatic Grad-CAM layer: layer4" in out
    assert "Unsupported operations: none" in out


def test_inspect_of_an_unknown_model_is_one_line(capsys):
    code, _, err = run(capsys, "inspect", "torchvision:not_a_model")
    assert code == 2 and len(err) == 1 and "unknown torchvision model" in err[0], err
