"""A text task where the answer is known: trigger words decide the class.

Sentences are random filler words; a sentence is of class 1 exactly when one
of the :data:`TRIGGERS` appears in it, anywhere. A classifier that solves the
task must look at the triggers and nothing else, so an explanation of class 1
should put its relevance on them: the demo, the tests and the tutorial use the
task to show that it does, and it serves as a faithfulness benchmark.

The model is a Hugging Face ``BertForSequenceClassification`` with a tiny
configuration and the tokenizer a word-level ``PreTrainedTokenizerFast`` built
from the task's vocabulary, both made here (no download). Training takes
seconds on one CPU core. Needs ``transformers`` (``pip install
'captum_graph[text]'``).

Examples::

    >>> from captum_graph.synthetic_text import TriggerTask, train_trigger_classifier
    >>> trained = train_trigger_classifier(seed=0)
    >>> trained.accuracy > 0.97
    True
    >>> texts, labels = TriggerTask().sample(4, seed=1)
    >>> trained.model(**trained.tokenizer(texts, padding=True, return_tensors="pt")).logits.argmax(1)
"""
import random
import time
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TRIGGERS", "FILLERS", "SPECIAL_TOKENS", "TriggerTask", "TrainedTextClassifier", "train_trigger_classifier"]

#: Words that make a sentence class 1.
TRIGGERS = ("excellent", "wonderful", "superb", "delightful")
#: Neutral words that fill the sentences.
FILLERS = (
    "the", "a", "cat", "dog", "house", "river", "table", "window", "green", "blue",
    "small", "large", "walks", "sees", "near", "under", "over", "and", "with", "from",
    "tree", "road", "city", "boat", "chair", "lamp", "book", "door", "cloud", "stone",
    "runs", "sits", "old", "new", "red", "quiet", "into", "behind", "garden", "bridge",
)  # fmt: skip
#: BERT's special tokens, in the order of their ids (padding is 0).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as error:
        raise ImportError(
            "the trigger-word task needs transformers: pip install 'transformers>=5.23' (or pip install 'captum_graph[text]')"
        ) from error
    return transformers


@dataclass(frozen=True)
class TriggerTask:
    """Random sentences of :data:`FILLERS`; class 1 iff one of :data:`TRIGGERS` appears.

    Args:
        min_words, max_words: sentence length range (words, before ``[CLS]`` and ``[SEP]``).
        positive_share: expected share of class-1 sentences.
        max_triggers: a class-1 sentence holds 1 to ``max_triggers`` triggers, at random positions.
    """

    min_words: int = 6
    max_words: int = 14
    positive_share: float = 0.5
    max_triggers: int = 2

    @property
    def vocabulary(self) -> Tuple[str, ...]:
        """Every token, in the order of its id: special tokens, fillers, triggers."""
        return SPECIAL_TOKENS + FILLERS + TRIGGERS

    def sample(self, count: int, seed: int = 0) -> Tuple[List[str], Tensor]:
        """``count`` sentences (space-separated words) and their labels (a long tensor of 0 and 1)."""
        draw = random.Random(seed)
        texts, labels = [], []
        for _ in range(count):
            words = [draw.choice(FILLERS) for _ in range(draw.randint(self.min_words, self.max_words))]
            positive = draw.random() < self.positive_share
            if positive:
                for position in draw.sample(range(len(words)), draw.randint(1, self.max_triggers)):
                    words[position] = draw.choice(TRIGGERS)
            texts.append(" ".join(words))
            labels.append(int(positive))
        return texts, torch.tensor(labels)

    def tokenizer(self) -> Any:
        """A word-level ``PreTrainedTokenizerFast`` of :attr:`vocabulary` that adds ``[CLS]`` and ``[SEP]``.

        It round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
        """
        transformers = _require_transformers()
        from tokenizers import Tokenizer, models, pre_tokenizers, processors

        ids = {token: index for index, token in enumerate(self.vocabulary)}
        backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        backend.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])],
        )
        return transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]"
        )

    def is_trigger(self, tokens: List[str]) -> Tensor:
        """A boolean tensor: which of ``tokens`` are triggers."""
        return torch.tensor([token in TRIGGERS for token in tokens])


class TrainedTextClassifier(NamedTuple):
    """A classifier trained on a :class:`TriggerTask` (eval mode), its tokenizer and how it did."""

    model: nn.Module
    tokenizer: Any
    accuracy: float
    seconds: float


def _tiny_bert(vocabulary_size: int, max_tokens: int, hidden_size: int, layers: int) -> nn.Module:
    transformers = _require_transformers()
    config = transformers.BertConfig(
        vocab_size=vocabulary_size,
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=max_tokens,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
        pad_token_id=0,
    )
    return transformers.BertForSequenceClassification(config)


@torch.no_grad()
def _accuracy(model: nn.Module, tokenizer: Any, texts: List[str], labels: Tensor) -> float:
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    return (model(**batch).logits.argmax(1) == labels).double().mean().item()


def train_trigger_classifier(
    task: TriggerTask = TriggerTask(),
    seed: int = 0,
    steps: int = 200,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    hidden_size: int = 32,
    layers: int = 2,
    test_size: int = 500,
) -> TrainedTextClassifier:
    """Train a tiny ``BertForSequenceClassification`` on ``task`` with AdamW, on one CPU thread.

    Deterministic for a ``seed``; the global random state is left as it was.
    With the defaults it reaches about 99 % accuracy on fresh sentences in a
    few seconds.

    Args:
        task: the sentences to learn.
        seed: seeds the weights and the sentences.
        steps, batch_size, learning_rate: AdamW's, with a linear decay to zero.
        hidden_size, layers: the BERT configuration (2 heads, MLP twice as wide).
        test_size: fresh sentences the returned accuracy is measured on.

    Returns:
        The model (eval mode), the tokenizer, test accuracy and training time in seconds.
    """
    from .demo import single_thread

    tokenizer = task.tokenizer()
    max_tokens = task.max_words + 2  # [CLS] and [SEP]
    texts, labels = task.sample(steps * batch_size, seed=seed)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]), single_thread():
        torch.manual_seed(seed)
        model = _tiny_bert(len(task.vocabulary), max_tokens, hidden_size, layers).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
        for step in range(steps):
            window = slice(step * batch_size, (step + 1) * batch_size)
            batch = tokenizer(texts[window], padding=True, return_tensors="pt")
            loss = F.cross_entropy(model(**batch).logits, labels[window])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        seconds = time.perf_counter() - started
        model.eval()
        test_texts, test_labels = task.sample(test_size, seed=seed + 1_000_003)
        accuracy = _accuracy(model, tokenizer, test_texts, test_labels)
    return TrainedTextClassifier(model, tokenizer, accuracy, seconds)
