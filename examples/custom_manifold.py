"""Register a manifold of your own and convert a model with it (no edits to hcpass).

H_res = (1 - t) I + t J with J the uniform averaging matrix and t = sigmoid(logit): doubly
stochastic, exactly the identity when t = 0.

    python examples/custom_manifold.py
"""

import torch
from torch import Tensor, nn

import hcpass
from hcpass.manifolds import Manifold, register_manifold


@register_manifold
class Averaging(Manifold):
    name = "averaging"
    description = "H_res = (1 - t) I + t * ones/n, one learned mixing rate per position"

    @property
    def res_logits(self) -> int:
        return 1

    def res_map(self, logits: Tensor) -> Tensor:
        n = self.streams
        t = torch.sigmoid(logits.float())[..., None]  # [..., 1, 1]
        eye = torch.eye(n, device=logits.device)
        return (1 - t) * eye + t * torch.full((n, n), 1.0 / n, device=logits.device)

    def res_identity_bias(self) -> Tensor:
        return torch.tensor([-30.0])  # t = sigmoid(-30) rounds to 0: H_res = I


def main() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[Residual(32) for _ in range(4)])
    x = torch.randn(8, 32)
    converted = hcpass.convert(model, (x,), streams=4, manifold="averaging")
    print(converted.report)
    print("max |converted - original|:", (converted(x) - model(x)).abs().max().item())


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.f(x))


if __name__ == "__main__":
    main()
