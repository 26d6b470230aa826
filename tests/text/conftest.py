"""Shared text fixtures: the trigger-word classifier, trained once per test session, and its saved folder."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from captum_graph.synthetic_text import train_trigger_classifier  # noqa: E402

#: Class names saved in the folder's config, shown by the CLI.
CLASS_NAMES = {0: "no trigger", 1: "trigger"}


@pytest.fixture(scope="session")
def trained():
    """The trigger-word classifier with the defaults of :func:`train_trigger_classifier` (seed 0)."""
    return train_trigger_classifier(seed=0)


@pytest.fixture(scope="session")
def hf_folder(trained, tmp_path_factory):
    """A ``save_pretrained`` folder with the trained classifier, its class names and its tokenizer."""
    folder = tmp_path_factory.mktemp("trigger_classifier")
    model = copy.deepcopy(trained.model)
    model.config.id2label = dict(CLASS_NAMES)
    model.config.label2id = {name: index for index, name in CLASS_NAMES.items()}
    model.save_pretrained(folder)
    trained.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bias_free(trained):
    """A float64 copy of the classifier without additive constants: biases, position and token-type embeddings zeroed."""
    copied = copy.deepcopy(trained.model).double().eval()
    with torch.no_grad():
        for name, parameter in copied.named_parameters():
            if name.endswith("bias") or "position_embeddings" in name or "token_type_embeddings" in name:
                parameter.zero_()
    return copied
