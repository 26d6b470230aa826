"""captum_graph's ``attn-lrp`` preset next to LXT's own AttnLRP rules, on a random LLaMA.

LXT 2.1 cannot be used as documented with transformers 5.23: ``import lxt.efficient``
fails (its BERT port imports ``find_pruneable_heads_and_indices``, since removed from
``transformers.pytorch_utils``), and its attention patch replaces the module's
``ALL_ATTENTION_FUNCTIONS`` (an ``AttentionInterface`` in transformers 5, whose
``get_interface`` the models call) by a plain dict. This script therefore loads LXT's
rule functions (``lxt/efficient/rules.py`` and ``patches.py``) without the package's
``__init__`` and applies LXT's LLaMA patch map by hand, with LXT's own functions: the
gated MLP (identity rule on SiLU, uniform rule on the product), RMSNorm (the root mean
square detached) and the attention wrapper (gradients of queries and keys quartered,
of values halved) on eager attention. LXT's relevance is Gradient x Input at the
input embeddings of the patched model, switched to eager attention (which LXT's wrapper
needs); captum_graph's is ``LRP(preset="attn-lrp")`` of the same model as built,
unpatched, with its default (``sdpa``) attention, on the same embeddings, computed first.

LXT patches classes process-wide: run this script in a process of its own. It prints
one line of JSON: the largest difference relative to the largest relevance, both
relevance sums per example, the logits and the median time of each.

    .venv/bin/python benchmarks/lxt_parity.py                        # small, float64
    .venv/bin/python benchmarks/lxt_parity.py --hidden 768 --layers 12 --heads 12 \\
        --batch 8 --sequence 128 --dtype float32                     # GPT-2 sized
"""
import argparse
import importlib
import json
import os
import statistics
import sys
import time
import types
import warnings

import torch

from captum_graph.text import LogitsFromEmbeddings


def load_lxt_rules() -> types.ModuleType:
    """``lxt.efficient.patches``, imported without running ``lxt/efficient/__init__.py``."""
    import lxt

    package = types.ModuleType("lxt.efficient")
    package.__path__ = [os.path.join(os.path.dirname(lxt.__file__), "efficient")]
    sys.modules["lxt.efficient"] = package
    return importlib.import_module("lxt.efficient.patches")


def build(hidden: int, layers: int, heads: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), vocab_size=1000, initializer_range=0.2, pad_token_id=0,
    )
    model = LlamaForSequenceClassification._from_config(config).to(dtype).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:  # RMSNorm weights: random, so that they matter
                parameter.uniform_(0.5, 1.5)
    return model




def _median_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(hidden: int, layers: int, heads: int, batch: int, sequence: int, dtype: torch.dtype, repeats: int) -> dict:
    from captum.attr import InputXGradient
    from transformers.models.llama import modeling_llama

    from captum_graph.attr import LRP

    patches = load_lxt_rules()  # before anything is patched: fails early where LXT is missing
    model = build(hidden, layers, heads, dtype)
    wrapper = LogitsFromEmbeddings(model)
    ids = torch.randint(1, 1000, (batch, sequence), generator=torch.Generator().manual_seed(1))
    embeddings = model.get_input_embeddings()(ids).detach()
    target = 0
    lrp = LRP(wrapper, preset="attn-lrp")
    ours = lrp.attribute(embeddings, target=target)
    ours_seconds = _median_seconds(lambda: lrp.attribute(embeddings, target=target), repeats)
    with torch.no_grad():
        logits = wrapper(embeddings)[:, target]

    # LXT's LLaMA patch map (lxt/efficient/models/llama.py), applied with LXT's functions
    model.set_attn_implementation("eager")
    modeling_llama.LlamaMLP.forward = patches.gated_mlp_forward
    modeling_llama.LlamaRMSNorm.forward = patches.rms_norm_forward
    modeling_llama.eager_attention_forward = patches.wrap_attention_forward(modeling_llama.eager_attention_forward)
    lxt = InputXGradient(wrapper)
    theirs = lxt.attribute(embeddings, target=target).detach()
    lxt_seconds = _median_seconds(lambda: lxt.attribute(embeddings, target=target), repeats)
    difference = (ours - theirs).abs().max() / theirs.abs().max()
    return {
        "config": {
            "hidden": hidden, "layers": layers, "heads": heads, "batch": batch, "sequence": sequence, "dtype": str(dtype),
            "threads": torch.get_num_threads(),
        },
        "max_difference_of_max_relevance": difference.item(),
        "captum_graph_sums": ours.flatten(1).sum(1).tolist(),
        "lxt_sums": theirs.flatten(1).sum(1).tolist(),
        "logits": logits.tolist(),
        "captum_graph_seconds": ours_seconds,
        "lxt_seconds": lxt_seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--sequence", type=int, default=12)
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(
        args.hidden, args.layers, args.heads, args.batch, args.sequence, getattr(torch, args.dtype), args.repeats
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
