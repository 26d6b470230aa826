"""Hugging Face transformers and timm's ViT, random small configs (hidden 32, 2 layers, 2 heads), float64.

For every family, at the model itself (token ids, or pixel values for the vision models):

* **cp-lrp conserves.** On a bias-free copy (biases, position and token-type
  embeddings, class and distillation tokens, relative position biases set to zero)
  relevance sums to the target logit per example within 1e-6 relative: at the
  word embeddings' output (``LayerLRP(model, model.get_input_embeddings())``,
  summed over the hidden dimension: one value per token) or at the pixels.
  Rotary position embeddings need no zeroing: they rotate queries and keys, a
  linear map without an additive term, and under cp-lrp no relevance enters
  queries and keys at all.
* **attn-lrp conserves everywhere but in the softmax.** AttnLRP's softmax rule keeps
  only the first-order Taylor terms, ``R_x = x * (R_s - s * sum(R_s))``; per row,
  ``sum(R_x) = sum_j R_s_j (x_j - sum_i s_i x_i)``, and the rest, the bias term of
  the linearisation, is absorbed. The zoo checks the exact budget: input relevance
  plus what every attention (or softmax) absorbs, its output relevance minus the
  relevance of its inputs, equals the logit within 1e-6 (of the larger of the two
  sides). ``tests/unit/test_transformer_rules.py`` checks the per-row identity.
* **padding is honoured.** With a padded example (pad tokens, attention mask zero),
  the padded positions get exactly no relevance.
* **biases do not break it.** On the model with its biases, relevance is finite.

Epsilon is negligible (1e-15) so the checks measure the rules, not the stabiliser.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from captum_graph import modules as M
from captum_graph.attr import LRP, LayerLRP
from helpers.oracles import negligible_epsilon

transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.filterwarnings("ignore:Input Tensor .* did not already require gradients"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

DTYPE = torch.float64
REPO = Path(__file__).resolve().parents[2]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
TEXT = dict(SMALL, vocab_size=50, initializer_range=0.2, pad_token_id=0)
DECODER = dict(TEXT, num_key_value_heads=1)  # grouped-query attention
VISION = dict(SMALL, image_size=16, patch_size=8, num_labels=3, initializer_range=0.2)
# name: (config class, model class, config keyword arguments)
TEXT_FAMILIES = {
    "bert": ("BertConfig", "BertForSequenceClassification", TEXT),
    "roberta": ("RobertaConfig", "RobertaForSequenceClassification", dict(TEXT, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForSequenceClassification", dict(
        dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=50, initializer_range=0.2, pad_token_id=0,
    )),
    "gpt2": ("GPT2Config", "GPT2ForSequenceClassification", dict(
        n_embd=32, n_layer=2, n_head=2, vocab_size=50, initializer_range=0.2, pad_token_id=0,
    )),
    "llama": ("LlamaConfig", "LlamaForSequenceClassification", DECODER),
    "mistral": ("MistralConfig", "MistralForSequenceClassification", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForSequenceClassification", DECODER),
    "gemma": ("GemmaConfig", "GemmaForSequenceClassification", dict(DECODER, head_dim=16)),
}
VISION_FAMILIES = {
    "vit": ("ViTConfig", "ViTForImageClassification", VISION),
    "deit": ("DeiTConfig", "DeiTForImageClassificationWithTeacher", VISION),
    "swin": ("SwinConfig", "SwinForImageClassification", dict(
        embed_dim=16, depths=[1, 1], num_heads=[2, 2], image_size=16, patch_size=2, window_size=4, num_labels=3,
        initializer_range=0.2,
    )),
    "convnext": ("ConvNextConfig", "ConvNextForImageClassification", dict(
        num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], image_size=16, num_labels=3, initializer_range=0.2,
        layer_scale_init_value=0.5,
    )),
    # timm's ViT (fused scaled_dot_product_attention), shrunk as the others
    "timm-vit": ("timm", "vit_tiny_patch16_224", dict(
        img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3,
    )),
}
# Additive constants of these families: biases, absolute position and token-type embeddings,
# class and distillation tokens, relative position biases (added to the attention scores).
ADDITIVE = re.compile(
    r"(^|\.)(bias|position_embeddings|token_type_embeddings|wpe|cls_token|distillation_token|mask_token"
    r"|relative_position_bias_table|pos_embed)(\.|$)"
)
PADDED = 2  # the second example's last two tokens are padding
TARGET = 1

NEGLIGIBLE = {preset: negligible_epsilon(preset) for preset in ("cp-lrp", "attn-lrp")}


def _build(config_class: str, model_class: str, kwargs: dict):
    if config_class == "timm":
        timm = pytest.importorskip("timm")
        model = timm.create_model(model_class, pretrained=False, **kwargs).to(DTYPE).eval()
        with torch.no_grad():
            for parameter in model.parameters():  # timm zeroes its head and tokens: draw them
                if parameter.dim() > 1 and not parameter.any():
                    parameter.normal_(0, 0.2)
    else:
        config = getattr(transformers, config_class)(**kwargs)
        model = getattr(transformers, model_class)(config).to(DTYPE).eval()
    with torch.no_grad():  # norm weights and layer scales away from their init of ones: they must matter
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1 and not ADDITIVE.search(name):
                parameter.uniform_(0.5, 1.5)
    return model


def _zero_additive_constants(model) -> None:
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ADDITIVE.search(name):
                parameter.zero_()


def _text_inputs(model, family: str):
    generator = torch.Generator().manual_seed(1)
    pad = model.config.pad_token_id
    ids = torch.randint(2, model.config.vocab_size, (2, 7), generator=generator)
    mask = torch.ones_like(ids)
    ids[1, -PADDED:], mask[1, -PADDED:] = pad, 0
    # GPT-2's forward reads (input_ids, past_key_values, attention_mask, ...): None fills the cache's place
    additional = (None, mask) if family == "gpt2" else (mask,)
    return ids, additional


def _logits(model, inputs, additional) -> torch.Tensor:
    with torch.no_grad():
        output = model(inputs, *additional)
    return (output if isinstance(output, torch.Tensor) else output.logits)[:, TARGET]


def _absorbed(model, inputs, additional, preset: str) -> torch.Tensor:
    """Per example, what the attentions (or softmaxes) absorb: output relevance minus input relevance."""
    gm = LRP(model).prepared(inputs, additional).graph_module
    sites = [
        n.meta["qualname"] for n in gm.graph.find_nodes(op="call_module")
        if isinstance(gm.get_submodule(n.target), (M.Attention, M.Softmax))
    ]
    assert sites, "no attention found"
    kwargs = dict(target=TARGET, additional_forward_args=additional)
    lrp = LayerLRP(model, sites, preset=preset, rules=NEGLIGIBLE[preset])
    outputs = lrp.attribute(inputs, **kwargs)
    entering = lrp.attribute(inputs, attribute_to_layer_input=True, **kwargs)
    batch = inputs.shape[0]

    def per_example(relevance):  # Swin's attention runs on windows, batch-major: (batch * windows, ...)
        return relevance.reshape(batch, -1).sum(1)

    total = 0
    for out, into in zip(outputs, entering):
        into = into if isinstance(into, tuple) else (into,)
        total = total + per_example(out) - sum(per_example(r) for r in into)
    return total


def _check_budget(relevance, absorbed, logits, name):
    total = relevance.flatten(1).sum(1)
    scale = torch.maximum(logits.abs(), absorbed.abs())
    error = ((total + absorbed - logits).abs() / scale).max().item()
    assert error < 1e-6, f"{name}: input relevance {total.tolist()} + absorbed {absorbed.tolist()} != logits {logits.tolist()}"


@pytest.mark.parametrize("family", list(TEXT_FAMILIES))
def test_text_family_per_token_relevance(family, assert_untouched):
    model = _build(*TEXT_FAMILIES[family])
    ids, additional = _text_inputs(model, family)
    embedding = model.get_input_embeddings()
    kwargs = dict(target=TARGET, additional_forward_args=additional)
    with assert_untouched(model):
        biased = LayerLRP(model, embedding, preset="cp-lrp").attribute(ids, **kwargs)
    assert biased.shape == ids.shape + (embedding.embedding_dim,)
    assert torch.isfinite(biased).all() and biased.abs().sum() > 0, f"{family}: relevance with biases"

    _zero_additive_constants(model)
    logits = _logits(model, ids, additional)
    for preset in ("cp-lrp", "attn-lrp"):
        relevance = LayerLRP(model, embedding, preset=preset, rules=NEGLIGIBLE[preset]).attribute(ids, **kwargs)
        per_token = relevance.sum(-1)
        assert per_token[1, -PADDED:].abs().max() == 0, f"{family} {preset}: relevance on padding {per_token[1]}"
        if preset == "cp-lrp":
            error = ((per_token.sum(1) - logits).abs() / logits.abs()).max().item()
            assert error < 1e-6, f"{family}: per-token relevance {per_token.sum(1).tolist()} != logits {logits.tolist()}"
        else:
            _check_budget(relevance, _absorbed(model, ids, additional, preset), logits, f"{family} attn-lrp")


@pytest.mark.parametrize("family", list(VISION_FAMILIES))
def test_vision_family_conserves_at_the_pixels(family, assert_untouched):
    model = _build(*VISION_FAMILIES[family])
    x = torch.randn(2, 3, 16, 16, dtype=DTYPE, generator=torch.Generator().manual_seed(1))
    with assert_untouched(model):
        biased = LRP(model, preset="cp-lrp").attribute(x, target=TARGET)
    assert torch.isfinite(biased).all() and biased.abs().sum() > 0, f"{family}: relevance with biases"

    _zero_additive_constants(model)
    logits = _logits(model, x, ())
    for preset in ("cp-lrp", "attn-lrp"):
        relevance = LRP(model, preset=preset, rules=NEGLIGIBLE[preset]).attribute(x, target=TARGET)
        if preset == "cp-lrp" or family == "convnext":  # no attention: attn-lrp conserves too
            error = ((relevance.flatten(1).sum(1) - logits).abs() / logits.abs()).max().item()
            assert error < 1e-6, f"{family} {preset}: relevance {relevance.flatten(1).sum(1).tolist()} != {logits.tolist()}"
        else:
            _check_budget(relevance, _absorbed(model, x, (), preset), logits, f"{family} attn-lrp")


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_inputs_embeds_wrapper_and_token_ids_give_the_same_relevance(family):
    """LRP of a wrapper taking ``inputs_embeds`` equals LayerLRP at the embedding with token ids.

    Without padding: from embeddings, a decoder's classifier cannot see pad tokens and reads the last one.
    """
    model = _build(*TEXT_FAMILIES[family])
    ids, (mask,) = _text_inputs(model, family)
    ids, mask = ids[:, :-PADDED], mask[:, :-PADDED]

    class LogitsFromEmbeddings(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, embeddings, attention_mask):
            return self.model(inputs_embeds=embeddings, attention_mask=attention_mask).logits

    embeddings = model.get_input_embeddings()(ids).detach()
    for preset in ("cp-lrp", "attn-lrp"):
        wrapped = LRP(LogitsFromEmbeddings(model), preset=preset).attribute(embeddings, TARGET, (mask,))
        direct = LayerLRP(model, "model.embed_tokens" if family == "llama" else "bert.embeddings.word_embeddings", preset=preset)
        torch.testing.assert_close(wrapped, direct.attribute(ids, TARGET, (mask,)), rtol=1e-9, atol=1e-12)


def test_attn_lrp_equals_lxt_rules():
    """captum_graph's attn-lrp gives LXT's AttnLRP relevance on a random LLaMA (float64).

    ``benchmarks/lxt_parity.py`` applies LXT's own rule functions (its patch map does not
    import next to transformers 5.23) in a process of its own, since LXT patches classes
    process-wide. LXT's RMSNorm computes in float32, which bounds the agreement.
    """
    pytest.importorskip("lxt")
    done = subprocess.run(
        [sys.executable, "benchmarks/lxt_parity.py"], cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["max_difference_of_max_relevance"] < 1e-6, result
