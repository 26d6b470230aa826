"""Relevance per token: from embedding relevance to HTML and terminal output.

A text model's relevance (LRP through an ``inputs_embeds`` wrapper, or
``LayerLRP`` at the embedding layer) has one value per token and hidden unit,
``(N, T, H)``. A token's relevance is the sum over its hidden units
(:func:`token_scores`). :class:`TokenRelevance` holds one text's tokens and
scores; it becomes a row of Captum's ``visualize_text``
(:meth:`TokenRelevance.to_record`) or a line of coloured text for a terminal
(:func:`render_terminal`). :func:`explain_texts` does all of it for a Hugging
Face style model and tokenizer.

Nothing here imports a model library: a model is anything that takes
``inputs_embeds=`` and ``attention_mask=`` and returns an object with
``.logits`` (every Hugging Face text model), a tokenizer anything with
``__call__`` and ``convert_ids_to_tokens`` (every Hugging Face tokenizer).

Examples::

    >>> from captum.attr import visualization
    >>> from captum_graph.text import explain_texts, render_terminal
    >>> results = explain_texts(model, tokenizer, ["a wonderful day", "a day"])
    >>> print(render_terminal(results))            # coloured on a terminal
    >>> visualization.visualize_text([r.to_record() for r in results])  # in a notebook
"""
import html
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, TextIO, Tuple, Union

import torch
from torch import Tensor, nn

__all__ = [
    "TokenRelevance",
    "LogitsFromEmbeddings",
    "token_scores",
    "token_relevance",
    "explain_texts",
    "render_terminal",
    "terminal_legend",
    "html_page",
    "require_ipython",
    "use_color",
]

TEXT_METHODS = ("lrp", "ixg")
Target = Union[None, int, Sequence[int], Tensor]

# xterm-256 background colours, faint to strong: red for positive relevance, blue for negative.
_REDS = (224, 217, 210, 196)
_BLUES = (189, 153, 111, 33)
# Below this share of the text's largest |score| a token stays uncoloured.
_FAINTEST = 0.1


@dataclass(frozen=True)
class TokenRelevance:
    """One text's relevance per token.

    Attributes:
        tokens: the model's tokens, special tokens included, padding removed.
        scores: one relevance per token (the sum over the token's hidden units).
        target: the class explained.
        predicted: the class the model predicts, when known.
        probability: the softmax probability of ``predicted``, when known.
        label: the true class, when known.
    """

    tokens: Tuple[str, ...]
    scores: Tuple[float, ...]
    target: Optional[int] = None
    predicted: Optional[int] = None
    probability: Optional[float] = None
    label: Optional[int] = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.scores):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.scores)} scores")

    @property
    def total(self) -> float:
        """The sum of the scores: on a bias-free model, the explained logit (conservation)."""
        return float(sum(self.scores))

    def normalized(self) -> Tuple[float, ...]:
        """The scores divided by the largest absolute score (all zero stays zero), in ``[-1, 1]``."""
        largest = max((abs(s) for s in self.scores), default=0.0)
        return tuple(s / largest if largest > 0 else 0.0 for s in self.scores)

    def top(self, k: int = 5) -> List[Tuple[int, str, float]]:
        """The ``k`` tokens of largest score, as ``(position, token, score)``, largest first."""
        order = sorted(range(len(self.scores)), key=lambda i: self.scores[i], reverse=True)
        return [(i, self.tokens[i], self.scores[i]) for i in order[:k]]

    def to_record(self) -> Any:
        """A ``captum.attr.visualization.VisualizationDataRecord`` for Captum's ``visualize_text``.

        Word importances are :meth:`normalized` (Captum clips them to
        ``[-1, 1]``), the attribution score is :attr:`total`. Tokens are
        HTML-escaped, since ``visualize_text`` writes them into its HTML as they
        are. Unknown fields (``predicted``, ``label``, ...) show as empty.
        """
        from captum.attr import visualization

        return visualization.VisualizationDataRecord(
            word_attributions=torch.tensor(self.normalized(), dtype=torch.float64),
            pred_prob=self.probability if self.probability is not None else float("nan"),
            pred_class=_shown(self.predicted),
            true_class=_shown(self.label),
            attr_class=_shown(self.target),
            attr_score=self.total,
            raw_input_ids=[html.escape(token) for token in self.tokens],
            convergence_score=None,
        )


def _shown(value: Optional[int]) -> Any:
    return "" if value is None else value


class LogitsFromEmbeddings(nn.Module):
    """``model(inputs_embeds=..., attention_mask=...).logits`` as a module that takes embeddings.

    Explain it with ``captum_graph.attr.LRP`` (or any Captum method) at the
    embeddings, ``model.get_input_embeddings()(input_ids)``, with the mask in
    ``additional_forward_args``. Works for every Hugging Face model whose
    forward accepts ``inputs_embeds`` and returns ``(batch, classes)`` logits
    (sequence classification).

    Padding: an encoder (BERT) honours the mask, but a decoder's sequence
    classifier (LLaMA, GPT-2, Qwen2, ...) given ``inputs_embeds`` reads its
    logit at the last position, padded or not. For those, batch texts of one
    length, as :func:`explain_texts` does.

    Args:
        model: the text model; it is called, never modified.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs_embeds: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits


def token_scores(relevance: Union[Tensor, Tuple[Tensor]]) -> Tensor:
    """Relevance per token: ``(N, T, H)`` summed over the hidden dimension to ``(N, T)``.

    Args:
        relevance: relevance at the embeddings (LRP of an ``inputs_embeds``
            wrapper, or ``LayerLRP`` at the embedding layer), ``(N, T, H)``, or
            already per token, ``(N, T)``; a tuple of one such tensor is unpacked.

    Raises:
        ValueError: relevance of another shape.
    """
    if isinstance(relevance, tuple) and len(relevance) == 1:
        relevance = relevance[0]
    if not isinstance(relevance, Tensor) or relevance.dim() not in (2, 3):
        shape = tuple(relevance.shape) if isinstance(relevance, Tensor) else type(relevance).__name__
        raise ValueError(f"relevance per token needs a (batch, tokens, hidden) or (batch, tokens) tensor, got {shape}")
    return relevance.sum(-1) if relevance.dim() == 3 else relevance


def token_relevance(
    relevance: Union[Tensor, Tuple[Tensor]],
    tokens: Union[Sequence[Sequence[str]], Tensor],
    tokenizer: Any = None,
    attention_mask: Optional[Tensor] = None,
    target: Target = None,
    logits: Optional[Tensor] = None,
    labels: Optional[Sequence[int]] = None,
) -> List[TokenRelevance]:
    """One :class:`TokenRelevance` per text of a batch.

    Args:
        relevance: ``(N, T, H)`` or ``(N, T)``, see :func:`token_scores`.
        tokens: the tokens of each text, or the ``input_ids`` (then ``tokenizer`` names them).
        tokenizer: turns ``input_ids`` into tokens (``convert_ids_to_tokens``).
        attention_mask: ``(N, T)``; positions where it is 0 (padding) are left out.
        target: the class explained: one for all texts, or one per text.
        logits: ``(N, classes)`` model outputs, to fill ``predicted`` and ``probability``.
        labels: the true classes, when known.

    Raises:
        ValueError: shapes that do not match, or ``input_ids`` without a tokenizer.
    """
    scores = token_scores(relevance).detach().to(torch.float64).cpu()
    count, length = scores.shape
    if isinstance(tokens, Tensor):
        if tokenizer is None:
            raise ValueError("token_relevance got input_ids: pass the tokenizer too (tokenizer=...)")
        tokens = [tokenizer.convert_ids_to_tokens(row.tolist()) for row in tokens]
    if len(tokens) != count or any(len(row) != length for row in tokens):
        raise ValueError(f"relevance is for {count} texts of {length} tokens; the tokens do not have that shape")
    keep = torch.ones(count, length, dtype=torch.bool) if attention_mask is None else attention_mask.cpu() != 0
    if keep.shape != scores.shape:
        raise ValueError(f"attention_mask has shape {tuple(keep.shape)}, relevance is per token {tuple(scores.shape)}")
    targets = _per_text(target, count, "target")
    labels = _per_text(labels, count, "labels")
    probabilities = logits.detach().float().softmax(-1).cpu() if logits is not None else None
    results = []
    for i in range(count):
        kept = keep[i].nonzero().flatten().tolist()
        predicted = int(probabilities[i].argmax()) if probabilities is not None else None
        results.append(
            TokenRelevance(
                tokens=tuple(tokens[i][j] for j in kept),
                scores=tuple(float(scores[i, j]) for j in kept),
                target=targets[i],
                predicted=predicted,
                probability=float(probabilities[i, predicted]) if probabilities is not None else None,
                label=labels[i],
            )
        )
    return results


def _per_text(value: Target, count: int, name: str) -> List[Optional[int]]:
    if value is None or isinstance(value, int):
        return [value] * count
    values = value.flatten().tolist() if isinstance(value, Tensor) else list(value)
    if len(values) == 1:
        return [int(values[0])] * count
    if len(values) != count:
        raise ValueError(f"{name} has {len(values)} values for {count} texts")
    return [int(v) for v in values]


def explain_texts(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    target: Target = None,
    method: str = "lrp",
    preset: Optional[str] = None,
) -> List[TokenRelevance]:
    """Tokenise ``texts``, explain the model's logit of ``target`` per token.

    Texts of the same number of tokens are explained together, one batch per
    length, so no text is padded: padding through ``inputs_embeds`` is not
    seen by every model (a decoder's sequence classifier reads its logit at
    the last position, padded or not). The model is explained at its input
    embeddings through :class:`LogitsFromEmbeddings`.

    Args:
        model: a text classifier taking ``inputs_embeds`` (any Hugging Face
            ``...ForSequenceClassification``), in eval mode.
        tokenizer: its tokenizer.
        texts: the texts, in the order of the results.
        target: the class to explain, one or one per text; ``None``: the predicted class.
        method: ``"lrp"`` (captum_graph's LRP) or ``"ixg"`` (Captum's InputXGradient).
        preset: the LRP rule preset (``None``: the default rules).

    Raises:
        ValueError: an unknown method, a target out of range, or a model whose
            logits are not ``(batch, classes)``.
    """
    if method not in TEXT_METHODS:
        raise ValueError(f"unknown method {method!r} for text; choose from {', '.join(TEXT_METHODS)}")
    targets = _per_text(target, len(texts), "target")
    token_ids = [tokenizer(text, return_tensors="pt")["input_ids"][0] for text in texts]
    by_length: Dict[int, List[int]] = {}
    for index, ids in enumerate(token_ids):
        by_length.setdefault(len(ids), []).append(index)
    wrapper = LogitsFromEmbeddings(model)
    explainer = _text_explainer(wrapper, method, preset)
    results: List[Optional[TokenRelevance]] = [None] * len(texts)
    for indices in by_length.values():
        input_ids = torch.stack([token_ids[i] for i in indices])
        with torch.no_grad():
            embeddings = model.get_input_embeddings()(input_ids)
            logits = wrapper(embeddings)
        chosen = _checked_targets([targets[i] for i in indices], logits)
        relevance = explainer.attribute(embeddings.requires_grad_(), target=chosen).detach()
        for i, result in zip(indices, token_relevance(relevance, input_ids, tokenizer, target=chosen, logits=logits)):
            results[i] = result
    return results


def _checked_targets(targets: List[Optional[int]], logits: Tensor) -> Tensor:
    """The targets as a tensor, the predicted class where a target is ``None``; raises if one is out of range."""
    if logits.dim() != 2:
        raise ValueError(
            f"the model's logits are {tuple(logits.shape)}; explaining text needs (batch, classes) logits "
            "(a sequence classifier)"
        )
    classes = logits.shape[1]
    chosen = [int(logits[k].argmax()) if t is None else t for k, t in enumerate(targets)]
    for value in chosen:
        if not 0 <= value < classes:
            raise ValueError(f"target {value} is out of range: the model has {classes} outputs (0..{classes - 1})")
    return torch.tensor(chosen)


def _text_explainer(wrapper: nn.Module, method: str, preset: Optional[str]) -> Any:
    if method == "ixg":
        from captum.attr import InputXGradient

        return InputXGradient(wrapper)
    from .attr import LRP

    return LRP(wrapper, preset=preset)


# ---------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------
def use_color(stream: Optional[TextIO] = None) -> bool:
    """Whether to colour output for ``stream`` (default stdout): a terminal, ``NO_COLOR`` unset, ``TERM`` not dumb."""
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _ansi_token(token: str, share: float) -> str:
    """``token`` on a background from the red (positive) or blue (negative) scale."""
    strength = abs(share)
    if strength < _FAINTEST:
        return token
    scale = _REDS if share > 0 else _BLUES
    level = min(len(scale) - 1, int((strength - _FAINTEST) / (1 - _FAINTEST) * len(scale)))
    foreground = 97 if scale is _BLUES and level == len(scale) - 1 else 30  # white on the darkest blue
    return f"\x1b[{foreground};48;5;{scale[level]}m{token}\x1b[0m"


def _header(result: TokenRelevance) -> str:
    explained = "" if result.target is None else f"class {result.target} "
    if result.predicted is not None:
        probability = "" if result.probability is None else f", p={result.probability:.2f}"
        explained += f"(predicted {result.predicted}{probability}) "
    return f"{explained.rstrip()}: relevance sum {result.total:+.4g}" if explained else f"relevance sum {result.total:+.4g}"


def terminal_legend(color: Optional[bool] = None) -> str:
    """A line that shows :func:`render_terminal`'s colours; empty without colour (``None``: :func:`use_color`)."""
    if not (use_color() if color is None else color):
        return ""
    return "legend: " + " ".join(_ansi_token(*sample) for sample in (("for the class", 1.0), ("weakly for", 0.3), ("against", -1.0)))


def render_terminal(
    results: Union[TokenRelevance, Sequence[TokenRelevance]], color: Optional[bool] = None, top: int = 3, legend: bool = True
) -> str:
    """Text for a terminal: per text, a header, the tokens and the ``top`` tokens by score.

    With colour, each token sits on a background whose strength is its share
    of the text's largest absolute score: red for positive relevance, blue for
    negative (tokens under 10 % stay plain). Without colour (not a terminal,
    ``NO_COLOR`` set), each token is followed by that share in brackets,
    ``wonderful[+1.00]``.

    Args:
        results: one or several :class:`TokenRelevance`.
        color: force colour on or off; ``None``: :func:`use_color` on stdout.
        top: how many top tokens to list (0: none).
        legend: end with :func:`terminal_legend` (only with colour).
    """
    results = [results] if isinstance(results, TokenRelevance) else list(results)
    color = use_color() if color is None else color
    lines = []
    for result in results:
        shares = result.normalized()
        if color:
            words = [_ansi_token(token, share) for token, share in zip(result.tokens, shares)]
        else:
            words = [f"{token}[{share:+.2f}]" for token, share in zip(result.tokens, shares)]
        lines.append(_header(result))
        lines.append("  " + " ".join(words))
        if top > 0:
            lines.append("  top: " + ", ".join(f"{token} {score:+.4g}" for _, token, score in result.top(top)))
    if color and legend:
        lines.append(terminal_legend(color))
    return "\n".join(lines)


def require_ipython() -> None:
    """Raise an ``ImportError`` that says how to install IPython, which Captum's ``visualize_text`` needs."""
    from captum.attr import visualization

    if not getattr(visualization, "HAS_IPYTHON", False):
        raise ImportError("rendering text as HTML uses Captum's visualize_text, which needs IPython: pip install ipython")


def html_page(results: Sequence[TokenRelevance], title: str = "Relevance per token") -> str:
    """A standalone HTML page of Captum's ``visualize_text`` table of ``results``.

    Needs IPython (Captum's ``visualize_text`` does). Captum's colours: green
    for positive relevance, red for negative. The table ``visualize_text``
    displays as it renders is captured, so nothing is shown or printed; in a
    notebook, ``visualize_text([r.to_record() for r in results])`` shows it.
    """
    from captum.attr import visualization

    require_ipython()
    from IPython.utils.capture import capture_output

    with capture_output():  # visualize_text displays its table (prints it outside a notebook) before returning it
        table = visualization.visualize_text([result.to_record() for result in results]).data
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title></head>\n'
        f"<body><h3>{html.escape(title)}</h3>\n{table}\n</body></html>\n"
    )
