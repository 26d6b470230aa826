"""The trigger-word task and its classifier: the model learns it, and LRP's relevance lands on the triggers.

A sentence is of class 1 exactly when a trigger word appears in it, so a
faithful explanation of class 1 puts its relevance on the triggers. Figures
(seed 0, about 100 positive test sentences of 12 words; trigger words are
about 11 % of their tokens): LRP's most relevant token is a trigger in all of
them, and the triggers carry 80-96 % of the absolute relevance (over seeds
0-2, sentences of 6-14 words). The test thresholds are 95 % and 60 %.
"""
import pytest
import torch

from captum_graph.attr import LayerLRP
from captum_graph.synthetic_text import FILLERS, SPECIAL_TOKENS, TRIGGERS, TriggerTask
from captum_graph.text import LogitsFromEmbeddings, explain_texts, token_relevance

#: Least share of positive sentences whose most relevant token is a trigger.
TOP_IS_TRIGGER = 0.95
#: Least mean share of a sentence's absolute relevance that its triggers carry.
TRIGGER_MASS = 0.6


def test_the_task_is_what_it_says():
    texts, labels = TriggerTask().sample(400, seed=7)
    assert labels.dtype == torch.long and set(labels.tolist()) == {0, 1}
    for text, label in zip(texts, labels.tolist()):
        words = text.split()
        assert 6 <= len(words) <= 14
        triggers = sum(word in TRIGGERS for word in words)
        assert (triggers > 0) == bool(label), text
        assert triggers <= 2
        assert all(word in FILLERS or word in TRIGGERS for word in words)
    assert 0.4 < labels.double().mean() < 0.6
    assert TriggerTask().sample(5, seed=7)[0] == texts[:5]  # deterministic per seed
    assert TriggerTask().sample(5, seed=8)[0] != texts[:5]


def test_the_tokenizer_round_trips_through_save_pretrained(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = TriggerTask().tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    text = "the cat sees a wonderful zebra"
    for candidate in (tokenizer, loaded):
        ids = candidate([text], return_tensors="pt")["input_ids"]
        assert candidate.convert_ids_to_tokens(ids[0].tolist()) == ["[CLS]", "the", "cat", "sees", "a", "wonderful", "[UNK]", "[SEP]"]
    assert tokenizer.pad_token_id == SPECIAL_TOKENS.index("[PAD]") == 0


def test_the_classifier_learns_the_task_in_seconds(trained):
    # The figure for the report; no timing assertion (the machine is shared): seconds are printed with -s.
    print(f"trained in {trained.seconds:.1f} s, test accuracy {trained.accuracy:.3f}")
    assert trained.accuracy >= 0.97
    assert not trained.model.training


def test_training_leaves_the_global_random_state_alone():
    from captum_graph.synthetic_text import train_trigger_classifier

    before = torch.random.get_rng_state()
    first = train_trigger_classifier(seed=3, steps=2, test_size=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    second = train_trigger_classifier(seed=3, steps=2, test_size=8)
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)  # deterministic per seed


def test_lrp_relevance_lands_on_the_triggers(trained, assert_untouched):
    task = TriggerTask(min_words=12, max_words=12)  # one length: explain_texts makes one batch, one graph
    texts, labels = task.sample(200, seed=12345)
    positives = [text for text, label in zip(texts, labels.tolist()) if label == 1]
    with assert_untouched(trained.model):
        results = explain_texts(trained.model, trained.tokenizer, positives, target=1)
    top_is_trigger, trigger_mass, trigger_share = [], [], []
    for text, result in zip(positives, results):
        assert result.tokens[1:-1] == tuple(text.split())  # padding removed, [CLS] and [SEP] kept
        is_trigger = task.is_trigger(list(result.tokens))
        scores = torch.tensor(result.scores)
        top_is_trigger.append(bool(is_trigger[scores.argmax()]))
        trigger_mass.append(float(scores[is_trigger].sum() / scores.abs().sum()))
        trigger_share.append(float(is_trigger.double().mean()))
    top = sum(top_is_trigger) / len(top_is_trigger)
    mass = sum(trigger_mass) / len(trigger_mass)
    share = sum(trigger_share) / len(trigger_share)
    print(f"{len(positives)} positive sentences: top token a trigger in {top:.1%}, "
          f"trigger relevance mass {mass:.1%}, trigger token share {share:.1%}")
    assert top >= TOP_IS_TRIGGER, f"the most relevant token is a trigger in only {top:.1%} of the sentences"
    assert mass >= TRIGGER_MASS, f"triggers carry {mass:.1%} of the relevance (their share of tokens: {share:.1%})"
    assert mass >= 4 * share


def test_per_token_relevance_sums_to_the_logit_on_a_bias_free_copy(trained, bias_free):
    texts, _ = TriggerTask().sample(6, seed=5)  # of several lengths: padding is in the batch
    batch = trained.tokenizer(texts, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())
    with torch.no_grad():
        logits = bias_free(**batch).logits
    results = explain_texts(bias_free, trained.tokenizer, texts)
    for i, result in enumerate(results):
        logit = float(logits[i, result.target])
        assert result.predicted == int(logits[i].argmax()) == result.target
        assert abs(result.total - logit) <= 1e-6 * abs(logit), (result.total, logit)


@pytest.mark.parametrize("layer", ["model.bert.embeddings", "model.bert.encoder.layer.0"])
def test_layer_lrp_at_the_embeddings_gives_tokens_that_sum_to_the_logit(trained, bias_free, layer):
    texts, _ = TriggerTask().sample(3, seed=6)
    batch = trained.tokenizer(texts, padding=True, return_tensors="pt")
    wrapper = LogitsFromEmbeddings(bias_free)
    embeddings = bias_free.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_()
    relevance = LayerLRP(wrapper, layer).attribute(embeddings, target=1, additional_forward_args=(batch["attention_mask"],))
    assert relevance.shape == embeddings.shape
    results = token_relevance(relevance, batch["input_ids"], trained.tokenizer, batch["attention_mask"], target=1)
    logits = wrapper(embeddings, batch["attention_mask"])[:, 1]
    for result, logit in zip(results, logits.tolist()):
        assert abs(result.total - logit) <= 1e-6 * abs(logit)
