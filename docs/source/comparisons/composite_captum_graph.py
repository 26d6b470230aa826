import torch
import torchvision
from captum_graph.attr import LRP

torch.manual_seed(0)  # the same random model and image in every snippet
model = torchvision.models.resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# the same rules; batch norms merged as zennit's canonizer does, for any architecture
lrp = LRP(model, preset="epsilon-plus-flat", fold_batch_norm=True)
relevance = lrp.attribute(image, target=3)
