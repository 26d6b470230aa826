"""One small model per timm model module, for the timm zoo tests.

``TIMM_MODELS`` maps a timm model module (the last component of
``timm.models.<module>``, as ``timm.list_modules()`` names it) to
``(model name, timm.create_model keyword arguments, input (H, W))``.

How an entry was chosen (the survey in the timm zoo notes, timm 1.0.31, torch 2.14):

* the model of the module with the fewest parameters (``test_*`` models where
  timm has them);
* the smallest input it accepts, 32x32 where possible (``img_size=32`` for models
  whose positional embeddings or attention biases are sized at construction);
* ``num_classes=10`` everywhere, and depth / width keyword arguments where the
  model's builder lets keyword arguments override its configuration, so that
  every entry still has each kind of block the module defines (at least one
  block per stage, a shifted-window block where there are shifted windows, a
  global-attention block where there are some) but captures in seconds.

Every entry runs forward in float64 at ``torch.randn(2, 3, H, W)`` and is
captured by ``torch.export.export(model, (x,), strict=False)``; the captured
program reproduces the model's output.

``EXCLUDED`` maps a module to the reason it has no entry.
"""
from typing import Dict, FrozenSet, Set, Tuple

__all__ = [
    "TIMM_MODELS", "EXCLUDED", "UNSUPPORTED", "NO_CONSERVATION", "TIMM_ADDITIVE_CONSTANT_NAMES",
    "TIMM_CONSTANT_MODULES", "FAST", "timm_model_modules", "build", "zero_timm_additive_constants",
]

_N = {"num_classes": 10}
#: a small transformer: two blocks, width 64, two heads
_TINY_VIT = {"depth": 2, "embed_dim": 64, "num_heads": 2}

TIMM_MODELS: Dict[str, Tuple[str, dict, Tuple[int, int]]] = {
    "beit": ("beit_base_patch16_224", {**_N, "img_size": 32, **_TINY_VIT}, (32, 32)),
    "byoanet": ("eca_botnext26ts_256", {**_N, "img_size": 32}, (32, 32)),
    "byobnet": ("test_byobnet", {**_N, "img_size": 32}, (32, 32)),
    "cait": ("cait_xxs24_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    # pooled patch tokens: its class tokens only ever attend with a query made from themselves, so with them
    # zeroed (the bias-free copy) a class-token head would output exactly 0
    "coat": ("coat_tiny", {**_N, "img_size": 32, "serial_depths": [1, 1, 1, 1], "parallel_depth": 1,
                           "global_pool": "avg"}, (32, 32)),
    "convit": ("convit_tiny", {**_N, "img_size": 32, "depth": 2, "local_up_to_layer": 1}, (32, 32)),
    "convmixer": ("convmixer_768_32", {**_N}, (32, 32)),
    "convnext": ("test_convnext", {**_N}, (32, 32)),
    "cpubone": ("cpubone_nano", {**_N}, (32, 32)),
    "crossvit": ("crossvit_tiny_240", {**_N, "depth": [[1, 1, 0], [1, 1, 0]]}, (32, 32)),
    "csatv2": ("csatv2", {**_N}, (64, 64)),
    "cspnet": ("cs3darknet_focus_s", {**_N}, (32, 32)),
    "cspnext": ("cspnext_tiny", {**_N}, (32, 32)),
    "davit": ("davit_tiny", {**_N, "embed_dims": (32, 64, 128, 256), "num_heads": (1, 2, 4, 8)}, (32, 32)),
    "deepseek_vit": ("deepseek_vit_412m", {**_N, "img_size": 42, "depth": 2, "embed_dim": 64, "num_heads": 2},
                     (42, 42)),
    "deit": ("deit_tiny_patch16_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    "densenet": ("densenet121", {**_N, "block_config": (2, 2, 2, 2)}, (32, 32)),
    "dla": ("dla46x_c", {**_N}, (32, 32)),
    "dpn": ("dpn48b", {**_N}, (32, 32)),
    "edgenext": ("edgenext_xx_small", {**_N}, (32, 32)),
    # the attention biases are sized for the 7x7 last stage of a 224x224 input
    "efficientformer": ("efficientformer_l1", {**_N, "depths": (1, 1, 1, 2)}, (224, 224)),
    "efficientformer_v2": ("efficientformerv2_s0", {**_N, "img_size": 32}, (32, 32)),
    "efficientnet": ("test_efficientnet", {**_N}, (32, 32)),
    "efficientvim": ("efficientvim_m1", {**_N, "depths": (1, 1, 1)}, (32, 32)),
    "efficientvit_mit": ("efficientvit_b0", {**_N}, (32, 32)),
    "efficientvit_msra": ("efficientvit_m0", {**_N, "img_size": 32, "depth": [1, 1, 1]}, (32, 32)),
    "eva": ("vit_tiny_patch16_dinov3_qkvb", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    "fasternet": ("fasternet_t0", {**_N}, (32, 32)),
    "fastvit": ("fastvit_t8", {**_N}, (32, 32)),
    "focalnet": ("focalnet_tiny_srf", {**_N}, (32, 32)),  # its builder fixes depths and width
    "gcvit": ("gcvit_xxtiny", {**_N, "img_size": 32}, (32, 32)),  # its builder fixes depths
    "gemma4_vit": ("gemma4_vit_167m", {**_N, "img_size": 32, "depth": 2, "embed_dim": 64, "num_heads": 2,
                                       "head_dim": 32, "intermediate_size": 128}, (32, 32)),
    "ghostnet": ("ghostnet_050", {**_N}, (32, 32)),
    "hardcorenas": ("hardcorenas_b", {**_N}, (32, 32)),
    "hgnet": ("hgnetv2_b0", {**_N}, (32, 32)),
    "hiera": ("hiera_tiny_224", {**_N, "img_size": 32, "stages": (1, 1, 1, 1)}, (32, 32)),
    "hieradet_sam2": ("sam2_hiera_tiny", {**_N, "stages": (1, 1, 2, 1), "global_att_blocks": (3,)}, (32, 32)),
    "hrnet": ("hrnet_w18_small", {**_N}, (32, 32)),
    "iformer": ("iformer_t", {**_N}, (32, 32)),
    "inception_next": ("inception_next_atto", {**_N}, (32, 32)),
    "inception_resnet_v2": ("inception_resnet_v2", {**_N}, (75, 75)),
    "inception_v3": ("inception_v3", {**_N}, (75, 75)),
    "inception_v4": ("inception_v4", {**_N}, (75, 75)),
    "lcnetv2": ("lcnetv2_small", {**_N}, (32, 32)),
    "levit": ("levit_128s", {**_N, "img_size": 32}, (32, 32)),
    "lowformer": ("lowformer_b0", {**_N}, (32, 32)),
    "mambaout": ("test_mambaout", {**_N}, (32, 32)),
    "maxxvit": ("test_coatnet", {**_N, "img_size": 32}, (32, 32)),
    "metaformer": ("poolformerv2_s12", {**_N}, (32, 32)),
    "mlp_mixer": ("gmlp_ti16_224", {**_N, "img_size": 32}, (32, 32)),  # its builder fixes num_blocks
    "mobilenetv3": ("mobilenetv3_small_050", {**_N}, (32, 32)),
    "mobilenetv5": ("mobilenetv5_base", {**_N, "channel_multiplier": 0.25}, (32, 32)),
    "mobilevit": ("mobilevit_xxs", {**_N, "img_size": 32}, (32, 32)),
    "mvitv2": ("mvitv2_tiny", {**_N, "img_size": 32}, (32, 32)),
    "naflexvit": ("naflexvit_base_patch16_parfac_gap", {**_N, "img_size": 32, **_TINY_VIT}, (32, 32)),
    "nasnet": ("nasnetalarge", {**_N, "stem_size": 32, "num_features": 768}, (32, 32)),  # a quarter of its width
    "nest": ("nest_tiny", {**_N, "img_size": 32}, (32, 32)),
    "nextvit": ("nextvit_small", {**_N, "depths": (1, 1, 5, 1)}, (32, 32)),  # stage 3 repeats in fives
    "nfnet": ("test_nfnet", {**_N}, (32, 32)),
    "pit": ("pit_ti_224", {**_N, "img_size": 32}, (32, 32)),
    "pnasnet": ("pnasnet5large", {**_N}, (32, 32)),
    "pvt_v2": ("pvt_v2_b0", {**_N}, (32, 32)),
    "qwen3_vit": ("qwen3_vit_88m", {**_N, "img_size": 32, **_TINY_VIT}, (32, 32)),
    "rdnet": ("rdnet_tiny", {**_N, "num_blocks_list": [1] * 7}, (32, 32)),
    "regnet": ("regnetx_002", {**_N}, (32, 32)),
    "repghost": ("repghostnet_050", {**_N}, (32, 32)),
    "repvit": ("repvit_m1", {**_N, "img_size": 32}, (32, 32)),
    "res2net": ("res2next50", {**_N, "layers": [1, 1, 1, 1]}, (32, 32)),
    "resnest": ("resnest14d", {**_N}, (32, 32)),
    "resnet": ("test_resnet", {**_N}, (32, 32)),
    "resnetv2": ("resnetv2_18", {**_N}, (32, 32)),
    "rexnet": ("rexnet_100", {**_N}, (32, 32)),
    "selecsls": ("selecsls42", {**_N}, (32, 32)),
    "senet": ("legacy_seresnet18", {**_N}, (32, 32)),
    "sequencer": ("sequencer2d_s", {**_N, "img_size": 32, "layers": [1, 1, 1, 1]}, (32, 32)),
    "shvit": ("shvit_s1", {**_N}, (32, 32)),
    "sknet": ("skresnet18", {**_N}, (32, 32)),
    "starnet": ("starnet_s050", {**_N}, (32, 32)),
    "swiftformer": ("swiftformer_xs", {**_N, "img_size": 32}, (32, 32)),
    # windows of 2 on a 64x64 input: stages of 16, 8, 4, 2 tokens a side, so the
    # second block of each of the first three stages has shifted windows
    "swin_transformer": ("swin_tiny_patch4_window7_224",
                         {**_N, "img_size": 64, "window_size": 2, "depths": (2, 2, 2, 2)}, (64, 64)),
    "swin_transformer_v2": ("swinv2_tiny_window16_256",
                            {**_N, "img_size": 64, "window_size": 2, "depths": (2, 2, 2, 2)}, (64, 64)),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224",
                               {**_N, "img_size": 64, "window_size": 2, "depths": (2, 2, 2, 2)}, (64, 64)),
    "tiny_vit": ("tiny_vit_5m_224", {**_N}, (32, 32)),
    "tnt": ("tnt_s_legacy_patch16_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    "tresnet": ("tresnet_m", {**_N, "layers": [1, 1, 1, 1]}, (32, 32)),
    "twins": ("twins_svt_small", {**_N, "img_size": 32, "depths": [1, 1, 2, 1]}, (32, 32)),
    "vgg": ("vgg11", {**_N, "mlp_ratio": 0.125}, (32, 32)),
    "visformer": ("visformer_tiny", {**_N, "img_size": 32}, (32, 32)),
    "vision_transformer": ("test_vit", {**_N, "img_size": 32}, (32, 32)),
    "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    "vision_transformer_relpos": ("test_vit_relpos", {**_N, "img_size": 32}, (32, 32)),
    # 4x4 tokens in windows of 2; block 1 attends globally
    "vision_transformer_sam": ("samvit_base_patch16_224",
                               {**_N, "img_size": 64, **_TINY_VIT, "window_size": 2, "global_attn_indexes": [1]},
                               (64, 64)),
    "vitamin": ("vitamin_small_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
    "volo": ("volo_d1_224", {**_N, "img_size": 32}, (32, 32)),
    "vovnet": ("ese_vovnet19b_slim_dw", {**_N}, (32, 32)),
    "xception": ("legacy_xception", {**_N}, (32, 32)),
    "xception_aligned": ("xception41p", {**_N}, (32, 32)),
    "xcit": ("xcit_nano_12_p8_224", {**_N, "img_size": 32, "depth": 2}, (32, 32)),
}

#: module -> why it has no entry
EXCLUDED: Dict[str, str] = {}

#: module -> (what the error names, why): LRP refuses these with UnsupportedOperationError, naming
#: the operation and the source line, never with a silent answer
UNSUPPORTED: Dict[str, Tuple[str, str]] = {
    "sequencer": ("aten.lstm", "nn.LSTM: recurrent cells have no LRP rule here (Arras et al. 2017's LSTM "
                               "rules are not implemented)"),
    "efficientvit_mit": ("aten.div", "ReLU linear attention divides the values' sum by the keys' sum, both from "
                                     "one matmul with a padded column of ones: no rule tells the normaliser apart"),
}

#: module -> why its bias-free copy still adds a constant, so that the
#: conservation oracle cannot apply (the finite-map check still runs)
NO_CONSERVATION: Dict[str, str] = {
    "csatv2": "its DCT stem un-normalises with fixed ImageNet statistics and converts to YCbCr with literal "
              "offsets (+128) before the DCT: constants in the code, not parameters that can be zeroed",
    "gemma4_vit": "its patch embedding maps pixels with 2 * (x - 0.5): a literal constant in the code",
    "iformer": "its attention values are sigmoid(conv(x)) (0.5 at x = 0), a sigmoid used as the signal, "
               "not as a gate, so relevance through it cannot be conserved",
}

#: Names (last component) of timm parameters that add a constant to the signal
#: and are not in ``helpers.oracles.ADDITIVE_CONSTANT_NAMES`` (yet). Found by
#: zeroing those names in every entry and checking that model(0) == 0.
TIMM_ADDITIVE_CONSTANT_NAMES: FrozenSet[str] = frozenset({
    "q_bias", "k_bias", "v_bias",  # beit, eva, swin v2: qkv biases kept apart (v_bias adds to the values)
    "cls_token1", "cls_token2", "cls_token3", "cls_token4",  # coat: one class token per stage
    "cls_token_0", "cls_token_1",  # crossvit: one per branch
    "pos_embed_0", "pos_embed_1",  # crossvit
    "pos_embed1", "pos_embed2", "pos_embed3",  # visformer: one per stage
    "pos_embed_x", "pos_embed_y",  # naflexvit: factorised positional embedding
    "pos_embed_window",  # hieradet_sam2: tiled window positional embedding
    "position_embedding_table",  # gemma4_vit: looked up by patch coordinates
    "patch_pos", "pixel_pos",  # tnt: outer and inner positional embeddings
    "bias_ih_l0", "bias_hh_l0", "bias_ih_l0_reverse", "bias_hh_l0_reverse",  # sequencer: nn.LSTM biases
})

#: Class names of timm modules that make a constant from no input at all (a
#: sine/cosine positional encoding projected by a convolution): the bias-free
#: copy zeroes their parameters. edgenext and xcit use it.
TIMM_CONSTANT_MODULES: FrozenSet[str] = frozenset({"PositionalEncodingFourier"})

#: the entries the default (not slow) test run covers
FAST: Set[str] = {"resnet", "efficientnet", "convnext", "vision_transformer", "nfnet", "byobnet"}


def timm_model_modules() -> Set[str]:
    """Every timm module that registers a model (``timm.list_modules()``)."""
    import timm

    return set(timm.list_modules())


def build(module: str):
    """The entry's model, float64 and eval, with weights that exercise every term; and its input (batch 2)."""
    import timm
    import torch
    from helpers.oracles import make_meaningful

    name, kwargs, (height, width) = TIMM_MODELS[module]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    x = torch.randn(2, 3, height, width, dtype=torch.float64)
    make_meaningful(model, x)
    return model, x


def zero_timm_additive_constants(model) -> None:
    """``helpers.oracles.zero_additive_constants`` and timm's own additive constants, in place."""
    import torch
    from helpers.oracles import ADDITIVE_CONSTANT_NAMES, zero_additive_constants

    zero_additive_constants(model)
    extra = TIMM_ADDITIVE_CONSTANT_NAMES - ADDITIVE_CONSTANT_NAMES
    with torch.no_grad():
        for qualname, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if qualname.rsplit(".", 1)[-1] in extra:
                tensor.zero_()
        for submodule in model.modules():
            if type(submodule).__name__ in TIMM_CONSTANT_MODULES:
                for parameter in submodule.parameters():
                    parameter.zero_()
