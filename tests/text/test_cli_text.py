"""``captum-graph explain hf:FOLDER --text ...`` and ``inspect hf:FOLDER``, in-process through ``main()``.

Every bad input gives one line on stderr and exit code 2, as for images.
``python -m captum_graph`` calls the same ``main()`` (``tests/cli/test_cli.py``
runs it in subprocesses), so no interpreter is started here.
"""
import pytest

from captum_graph import text as text_module
from captum_graph.cli import main

POSITIVE = "the cat sees a wonderful tree"
NEGATIVE = "a dog near the river"


def run(capsys, *args):
    """``main(args)``: (exit code, stdout, the stderr lines)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def folders(hf_folder, trained, tmp_path_factory):
    """The classifier's folder, and broken ones: no config, no tokenizer, a model without inputs_embeds."""
    from transformers import ViTConfig, ViTForImageClassification

    root = tmp_path_factory.mktemp("hf_folders")
    (root / "empty").mkdir()
    trained.model.save_pretrained(root / "no_tokenizer")
    vit = ViTForImageClassification(ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                              intermediate_size=32, image_size=8, patch_size=4, num_labels=2))
    vit.save_pretrained(root / "vit")
    trained.tokenizer.save_pretrained(root / "vit")
    return {"model": hf_folder, "root": root}


def test_explain_prints_relevance_per_token(folders, capsys):
    code, out, err = run(capsys, "explain", f"hf:{folders['model']}", "--text", POSITIVE, "--text", NEGATIVE)
    assert code == 0, err
    assert out.startswith("classes: 0 = no trigger, 1 = trigger\n")
    assert f"[LRP] text 1: {POSITIVE}" in out and f"[LRP] text 2: {NEGATIVE}" in out
    assert "class 1 (predicted 1, p=1.00): relevance sum +" in out
    assert "class 0 (predicted 0, p=1.00): relevance sum +" in out
    assert "wonderful[+1.00]" in out  # the trigger gets the largest share, printed without colour off a terminal
    assert "  top: wonderful +" in out
    assert "\x1b[" not in out and "legend" not in out


def test_explain_in_colour_on_a_terminal(folders, capsys, monkeypatch):
    monkeypatch.setattr(text_module, "use_color", lambda stream=None: True)
    code, out, err = run(capsys, "explain", f"hf:{folders['model']}", "--text", POSITIVE, "--top", "1")
    assert code == 0, err
    assert "\x1b[30;48;5;196mwonderful\x1b[0m" in out
    assert out.count("legend: ") == 1
    assert out.count("top: ") == 1 and "top: wonderful +" in out


def test_explain_writes_html_for_each_method(folders, capsys, tmp_path):
    pytest.importorskip("IPython")
    code, out, err = run(capsys, "explain", f"hf:{folders['model']}", "--text", POSITIVE, NEGATIVE,
                         "--method", "lrp,ixg", "--target", "1", "--out", tmp_path / "html")
    assert code == 0, err
    assert "[Input × Gradient] text 2" in out and out.count("class 1 (predicted") == 4
    assert "Wrote 2 HTML pages" in out
    for method in ("lrp", "ixg"):
        page = (tmp_path / "html" / f"text_{method}.html").read_text(encoding="utf-8")
        assert page.startswith("<!DOCTYPE html>")
        for word in (POSITIVE + " " + NEGATIVE).split() + ["[CLS]", "[SEP]"]:
            assert word in page, (method, word)


def test_inspect_reports_an_hf_model(folders, capsys):
    code, out, err = run(capsys, "inspect", f"hf:{folders['model']}")
    assert code == 0, err
    assert "Model: LogitsFromEmbeddings" in out
    assert "Unsupported operations: none" in out


CASES = {
    # name: (arguments after `explain`, expected message); {m}: the model's folder, {r}: the broken folders
    "text for an image model": (["torchvision:resnet18", "--text", "hello"], "--text needs a Hugging Face model saved with save_pretrained"),
    "image for an hf model": (["hf:{m}", "--image", "cat.png", "--out", "{r}/out"], "hf: models are explained with --text"),
    "Grad-CAM for text": (["hf:{m}", "--text", "hello", "--method", "lrp,gradcam"], "gradcam explains images; for --text choose from lrp, ixg"),
    "missing folder": (["hf:{r}/nope", "--text", "hello"], "hf: model folder not found: {r}/nope"),
    "folder without a model": (["hf:{r}/empty", "--text", "hello"], "{r}/empty has no config.json: save the model there"),
    "folder without a tokenizer": (["hf:{r}/no_tokenizer", "--text", "hello"], "{r}/no_tokenizer holds no tokenizer: save it there with tokenizer.save_pretrained"),
    "model without inputs_embeds": (["hf:{r}/vit", "--text", "hello"], "ViTForImageClassification takes no inputs_embeds"),
    "target out of range": (["hf:{m}", "--text", "hello", "--target", "5"], "target 5 is out of range: the model has 2 outputs (0..1)"),
    "target not a number": (["hf:{m}", "--text", "hello", "--target", "yes"], "--target must be 'auto' or a class index"),
    "empty text": (["hf:{m}", "--text", "the cat", "  "], "--text got an empty text"),
    "negative --top": (["hf:{m}", "--text", "the cat", "--top", "-1"], "--top must be 0 or more, got -1"),
    "text too long for the model": (["hf:{m}", "--text", "the cat " * 20], "a text has 42 tokens; the model takes at most 16 (its max_position_embeddings)"),
    "weights for an hf model": (["hf:{m}", "--text", "hello", "--weights", "w.pt"], "--weights, --num-classes and --layer are for image models"),
    "unknown preset": (["hf:{m}", "--text", "hello", "--preset", "alpha-beta"], "unknown preset 'alpha-beta'"),
    "unwritable output": (["hf:{m}", "--text", "hello", "--out", "{r}/vit/config.json"], "is not writable"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line_and_exit_code_2(folders, capsys, name):
    args, message = CASES[name]
    fill = dict(m=folders["model"], r=folders["root"])
    code, out, err = run(capsys, "explain", *[a.format(**fill) for a in args])
    assert code == 2, (code, out, err)
    assert len(err) == 1 and err[0].startswith("captum-graph: error: "), err
    assert message.format(**fill) in err[0], err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "hello", "--image", "cat.png"], "argument --image: not allowed with argument --text"),
        ([], "one of the arguments --image --text is required"),
        (["--image", "cat.png"], "the following arguments are required: --out"),
    ],
)
def test_argparse_errors_about_images_and_texts(folders, capsys, args, message):
    with pytest.raises(SystemExit) as stopped:
        main(["explain", f"hf:{folders['model']}", *args])
    assert stopped.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0] and "captum-graph explain --help" in err[0], err


def test_help_tells_about_text(capsys):
    for argv, expected in (
        (["--help"], ["hf:my_classifier/ --text"]),
        (["explain", "--help"], ["--text TEXT", "hf:FOLDER", "save_pretrained", "text_METHOD.html", "--top K", "text: lrp or ixg"]),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        help_text = capsys.readouterr().out
        for piece in expected:
            assert piece in help_text, (argv, piece)
        assert max(len(line) for line in help_text.splitlines()) <= 120

