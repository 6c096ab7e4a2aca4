"""A user model referenced from job.yaml by import path (`mymodels:TinyNet`).

`runner train examples/user_model/job.yaml` works from any folder: the CLI puts the job file's folder on
sys.path, so this module imports by its plain name. Any class or factory works; `args` in the job file
become its keyword arguments.
"""
from torch import nn


class TinyNet(nn.Module):
    """Flatten → one hidden layer → logits; sized for the 8×8 `digits` images."""

    def __init__(self, in_features: int = 64, hidden: int = 64, num_classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
