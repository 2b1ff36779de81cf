"""The demo's data: bytes of Python's standard library sources, and batches cut from them."""

from __future__ import annotations

import os
import random
import sysconfig
from pathlib import Path

import torch
from torch import Tensor


def stdlib_files() -> list[Path]:
    """Python's standard library sources in sorted order (installed packages excluded)."""
    paths = sysconfig.get_paths()
    root = Path(paths["stdlib"])
    installed = {Path(paths[k]) for k in ("purelib", "platlib")}
    files = []
    for folder, subfolders, names in os.walk(root):
        # site-packages usually lies inside the stdlib folder: don't descend into it.
        subfolders[:] = [d for d in subfolders if Path(folder, d) not in installed]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    if not files:
        raise RuntimeError(f"no .py files found under {root}")
    return sorted(files)


def load_corpus(max_bytes: int, val_fraction: float = 0.1) -> tuple[Tensor, Tensor]:
    """(train, validation) byte tensors drawn from whole stdlib files.

    The file order is a fixed shuffle of the sorted list (independent of --seed: every seed
    sees the same corpus), so the cap samples all of the library rather than its first
    packages alphabetically; validation is a separate set of files, not a slice of ones
    the model trains on."""
    files = stdlib_files()
    random.Random(0).shuffle(files)
    val_bytes = int(max_bytes * val_fraction)
    val: list[bytes] = []
    train: list[bytes] = []
    size_val = size_train = 0
    for f in files:
        data = f.read_bytes()
        if size_val < val_bytes:
            val.append(data)
            size_val += len(data)
        elif size_train < max_bytes - val_bytes:
            train.append(data)
            size_train += len(data)
        else:
            break

    def tensor(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8).long()

    return tensor(train)[: max_bytes - val_bytes], tensor(val)[:val_bytes]


def batch_at(data: Tensor, starts: Tensor, context: int) -> tuple[Tensor, Tensor]:
    index = starts[:, None] + torch.arange(context + 1)
    chunk = data[index]
    return chunk[:, :-1], chunk[:, 1:]
