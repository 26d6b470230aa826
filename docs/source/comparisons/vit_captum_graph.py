import torch
from torchvision.models import vit_b_16

from captum_graph.attr import LRP

# same random model and image everywhere
torch.manual_seed(0)
model = vit_b_16(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# nothing patched: the graph is rewritten
relevance = LRP(model).attribute(
    image, target=3)
