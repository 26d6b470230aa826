"""``captum_graph.text``: relevance per token, the result type, Captum's ``visualize_text`` and terminal output."""
import dataclasses
import io
import re

import pytest
import torch

from captum_graph.text import (
    TokenRelevance,
    explain_texts,
    html_page,
    render_terminal,
    token_relevance,
    token_scores,
    use_color,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def example(**fields) -> TokenRelevance:
    values = dict(tokens=("[CLS]", "a", "wonderful", "dull", "day", "[SEP]"), scores=(0.0, 0.05, 2.0, -1.0, 0.3, 0.0))
    return TokenRelevance(**{**values, **fields})


class IdTokenizer:
    """Names token ids ``t0``, ``t1``, ... (what ``token_relevance`` needs of a tokenizer)."""

    def convert_ids_to_tokens(self, ids):
        return [f"t{i}" for i in ids]


# ---------------------------------------------------------------------------
# per-token relevance
# ---------------------------------------------------------------------------
def test_token_scores_sum_over_the_hidden_dimension():
    relevance = torch.arange(24, dtype=torch.float64).reshape(2, 3, 4)
    assert torch.equal(token_scores(relevance), relevance.sum(-1))
    assert torch.equal(token_scores((relevance,)), relevance.sum(-1))  # LayerLRP's tuple of one
    per_token = torch.ones(2, 3)
    assert token_scores(per_token) is per_token


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(1, 2, 3, 4), [torch.ones(2, 3)]])
def test_token_scores_refuse_other_shapes(bad):
    with pytest.raises(ValueError, match="needs a \\(batch, tokens, hidden\\) or \\(batch, tokens\\) tensor"):
        token_scores(bad)


def test_token_relevance_drops_padding_and_fills_predictions():
    relevance = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [0.5, 0.5]], [[3.0, 0.0], [7.0, 7.0], [9.0, 9.0]]])
    input_ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    first, second = token_relevance(relevance, input_ids, IdTokenizer(), mask, target=[1, 0], logits=logits, labels=[1, 1])
    assert first.tokens == ("t5", "t6", "t7") and first.scores == (2.0, 2.0, 1.0)
    assert second.tokens == ("t8",) and second.scores == (3.0,)  # padding is left out
    assert (first.target, second.target) == (1, 0)
    assert (first.predicted, second.predicted) == (1, 0)
    assert first.probability == pytest.approx(torch.tensor([0.0, 2.0]).softmax(0)[1].item())
    assert (first.label, second.label) == (1, 1)


def test_token_relevance_takes_tokens_as_strings_and_one_target_for_all():
    results = token_relevance(torch.ones(2, 2), [["a", "b"], ["c", "d"]], target=torch.tensor([1]))
    assert [r.tokens for r in results] == [("a", "b"), ("c", "d")]
    assert [r.target for r in results] == [1, 1]
    assert results[0].predicted is None and results[0].probability is None and results[0].label is None


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(tokens=torch.zeros(2, 3, dtype=torch.long)), "pass the tokenizer too"),
        (dict(tokens=[["a", "b", "c"]]), "relevance is for 2 texts of 3 tokens"),
        (dict(tokens=[["a", "b"], ["c", "d"]]), "relevance is for 2 texts of 3 tokens"),
        (dict(tokens=[["a"] * 3] * 2, attention_mask=torch.ones(2, 4)), "attention_mask has shape \\(2, 4\\)"),
        (dict(tokens=[["a"] * 3] * 2, target=[0, 1, 1]), "target has 3 values for 2 texts"),
    ],
)
def test_token_relevance_says_what_does_not_fit(kwargs, message):
    with pytest.raises(ValueError, match=message):
        token_relevance(torch.ones(2, 3, 4), **kwargs)


# ---------------------------------------------------------------------------
# the result type
# ---------------------------------------------------------------------------
def test_the_result_is_frozen_and_checks_its_lengths():
    result = example()
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.scores = ()
    with pytest.raises(ValueError, match="6 tokens but 2 scores"):
        example(scores=(1.0, 2.0))
    assert result.total == pytest.approx(1.35)
    assert result.normalized() == pytest.approx((0.0, 0.025, 1.0, -0.5, 0.15, 0.0))
    assert example(scores=(0.0,) * 6).normalized() == (0.0,) * 6
    assert result.top(2) == [(2, "wonderful", 2.0), (4, "day", 0.3)]


def test_visualize_text_renders_the_records():
    pytest.importorskip("IPython")
    from captum.attr import visualization

    results = [
        example(target=1, predicted=1, probability=0.9, label=1),
        TokenRelevance(tokens=("<s>", "x<y", "&", "plain"), scores=(0.1, 0.2, -0.3, 0.0)),
    ]
    records = [result.to_record() for result in results]
    assert all(isinstance(record, visualization.VisualizationDataRecord) for record in records)
    assert torch.allclose(records[0].word_attributions, torch.tensor(results[0].normalized(), dtype=torch.float64))
    assert records[0].attr_score == pytest.approx(results[0].total)
    assert (records[0].pred_class, records[0].true_class, records[0].attr_class) == (1, 1, 1)
    page = visualization.visualize_text(records).data
    for token in results[0].tokens:
        assert token in page
    assert "x&lt;y" in page and "&amp;" in page and "x<y" not in page  # escaped: tokens cannot break the HTML
    assert page.count("<mark") == len(results[0].tokens) + len(results[1].tokens)


def test_html_page_is_a_standalone_page_of_visualize_text(capsys):
    pytest.importorskip("IPython")
    page = html_page([example(target=1)], title="LRP <test>")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>LRP &lt;test&gt;</title>" in page
    assert all(token in page for token in example().tokens)
    assert "hsl(" in page  # Captum's colours
    assert capsys.readouterr().out == ""  # visualize_text's display call is kept quiet


# ---------------------------------------------------------------------------
# terminal
# ---------------------------------------------------------------------------
def test_terminal_colours_red_for_positive_blue_for_negative():
    text = render_terminal(example(target=1, predicted=1, probability=0.97), color=True, top=2)
    lines = text.splitlines()
    assert lines[0] == "class 1 (predicted 1, p=0.97): relevance sum +1.35"
    assert "\x1b[30;48;5;196mwonderful\x1b[0m" in lines[1]  # strongest positive: the strongest red
    assert "\x1b[30;48;5;153mdull\x1b[0m" in lines[1]  # half as strong, negative: the second of four blues
    assert " a " in ANSI.sub("", lines[1]) and "\x1b[30;48;5;224ma" not in lines[1]  # 2.5 %: left plain
    assert lines[2] == "  top: wonderful +2, day +0.3"
    assert lines[-1].startswith("legend: ")
    assert ANSI.sub("", lines[1]) == "  [CLS] a wonderful dull day [SEP]"


def test_terminal_without_colour_writes_shares_in_brackets():
    text = render_terminal([example(), example(target=0)], color=False, top=0)
    assert "\x1b" not in text
    assert text.splitlines() == [
        "relevance sum +1.35",
        "  [CLS][+0.00] a[+0.03] wonderful[+1.00] dull[-0.50] day[+0.15] [SEP][+0.00]",
        "class 0: relevance sum +1.35",
        "  [CLS][+0.00] a[+0.03] wonderful[+1.00] dull[-0.50] day[+0.15] [SEP][+0.00]",
    ]


def test_colour_only_on_a_terminal(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_color(Terminal()) is True
    assert use_color(io.StringIO()) is False  # a pipe or a file
    monkeypatch.setenv("NO_COLOR", "1")
    assert use_color(Terminal()) is False
    monkeypatch.delenv("NO_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    assert use_color(Terminal()) is False


# ---------------------------------------------------------------------------
# explain_texts on an untrained tiny BERT
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert():
    transformers = pytest.importorskip("transformers")
    from captum_graph.synthetic_text import TriggerTask

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(TriggerTask().vocabulary), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config).eval(), TriggerTask().tokenizer()


def test_explain_texts_with_both_methods_and_targets(tiny_bert, assert_untouched):
    model, tokenizer = tiny_bert
    texts = ["the cat", "a wonderful small dog"]
    with assert_untouched(model):
        lrp = explain_texts(model, tokenizer, texts, target=2)
        ixg = explain_texts(model, tokenizer, texts, target=[0, 1], method="ixg")
    assert [r.tokens for r in lrp] == [("[CLS]", "the", "cat", "[SEP]"), ("[CLS]", "a", "wonderful", "small", "dog", "[SEP]")]
    assert [r.target for r in lrp] == [2, 2] and [r.target for r in ixg] == [0, 1]
    assert all(r.predicted is not None and 0 < r.probability <= 1 for r in lrp + ixg)
    predicted = explain_texts(model, tokenizer, texts)
    assert [r.target for r in predicted] == [r.predicted for r in predicted]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="gradcam"), "unknown method 'gradcam' for text; choose from lrp, ixg"),
        (dict(target=3), "target 3 is out of range: the model has 3 outputs \\(0..2\\)"),
        (dict(target=-1), "target -1 is out of range"),
    ],
)
def test_explain_texts_refuses_bad_arguments(tiny_bert, kwargs, message):
    model, tokenizer = tiny_bert
    with pytest.raises(ValueError, match=message):
        explain_texts(model, tokenizer, ["the cat"], **kwargs)


def test_explain_texts_pads_nothing_so_a_decoder_classifier_explains_its_own_logit():
    # Given inputs_embeds, a decoder's sequence classifier reads its logit at the last position, padded or not:
    # texts of different lengths must not share a padded batch. LLaMA has no additive constants (no biases,
    # rotary positions), so the relevance sums to the logit that input_ids give.
    transformers = pytest.importorskip("transformers")
    from captum_graph.synthetic_text import TriggerTask

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(TriggerTask().vocabulary), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, num_labels=2, pad_token_id=0,
    )
    model = transformers.LlamaForSequenceClassification(config).double().eval()
    tokenizer = TriggerTask().tokenizer()
    texts = ["the cat", "a wonderful small dog", "the dog"]
    results = explain_texts(model, tokenizer, texts, target=1)
    for text, result in zip(texts, results):
        with torch.no_grad():
            logit = float(model(**tokenizer([text], return_tensors="pt")).logits[0, 1])
        assert result.tokens == ("[CLS]", *text.split(), "[SEP]")
        assert abs(result.total - logit) <= 1e-6 * abs(logit), (text, result.total, logit)
