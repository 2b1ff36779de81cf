"""Convert a small ResNet (NCHW, a projection shortcut), then look at its mixers.

python examples/resnet_inspect.py      # writes resnet_mixers.png with the [plot] extra
"""

import torch
import torch.nn.functional as F
from torch import nn

import hcpass


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1),
        nn.ReLU(),
        Block(16, 16),
        Block(16, 16),
        Block(16, 32, 2),
        Block(32, 32),
    ).eval()
    images = torch.randn(2, 3, 16, 16)
    converted = hcpass.convert(model, (images,), streams=4, manifold="kronecker")
    print(converted.report)
    for name, site in hcpass.mixers(converted, (images,)).items():
        print(name, "H_res (mean over pixels):", site["h_res"].mean((0, 1, 2)).diag().tolist())
    for row in hcpass.gain(converted, (images,)):
        print(row)
    try:
        hcpass.plot.mixers(converted, (images,), "resnet_mixers.png")
        print("wrote resnet_mixers.png")
    except ImportError as error:
        print(error)


if __name__ == "__main__":
    main()
