import torch
from torchvision.models import resnet18

from captum_graph.attr import LRP

# same random model and image everywhere
torch.manual_seed(0)
model = resnet18(weights=None).eval()
image = torch.randn(1, 3, 224, 224)

# the same rules; batch norms merged as
# zennit's canonizer does, in any model
lrp = LRP(model, preset="epsilon-plus-flat",
          fold_batch_norm=True)
relevance = lrp.attribute(image, target=3)
