"""Activation memory of Attention Residuals: the bytes autograd saves for the backward of
one training forward, plain vs full AttnRes vs Block AttnRes, at several depths.

    python benchmarks/attnres_memory.py                   # C = 128, B = 8, T = 128; 8 and 16 layers
    python benchmarks/attnres_memory.py --layers 8 16 32 --block-size 4

Saved tensors are counted once per storage (autograd's saved-tensor hooks), parameters
left out. Reported per position in units of C values of the stream's dtype ("d"): Block
AttnRes should cost plain + O(N) d for N blocks, full AttnRes plain + O(L) d. Results go
to benchmarks/results/<device>-<date>.json (section "attnres_memory").
"""

from __future__ import annotations

import argparse

import common
import gpt
import torch
from torch import nn

import hcpass


def saved_bytes(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one forward."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = gpt.loss(model, ids, targets)
    loss.backward()
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--block-size", type=int, default=4, help="sites per block")
    args = parser.parse_args()

    ids, targets = gpt.batch(args.batch, args.seq)
    unit = args.batch * args.seq * args.dim * 4  # one d-vector per position, fp32
    rows, results = [], []
    for layers in args.layers:
        torch.manual_seed(0)
        plain = gpt.model(args.dim, layers, args.heads, args.seq)
        variants = {
            "plain": plain,
            "full": hcpass.convert(plain, (ids,), family="attnres"),
            "block": hcpass.convert(plain, (ids,), family="attnres", block_size=args.block_size),
        }
        measured = {name: saved_bytes(m, ids, targets) / unit for name, m in variants.items()}
        blocks = -(-2 * layers // args.block_size)  # N: sites (2 per layer) / block size
        row = {"layers": layers, "blocks": blocks, **measured}
        row["full_extra"] = measured["full"] - measured["plain"]
        row["block_extra"] = measured["block"] - measured["plain"]
        results.append(row)
        rows.append(
            [
                str(layers),
                str(blocks),
                f"{measured['plain']:.1f}",
                f"{measured['full']:.1f} (+{row['full_extra']:.1f})",
                f"{measured['block']:.1f} (+{row['block_extra']:.1f})",
            ]
        )
    common.print_table(
        ["layers", "N blocks", "plain d/pos", "full AttnRes d/pos", "Block AttnRes d/pos"], rows
    )
    path = common.write_results("attnres_memory", {"config": vars(args), "results": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
