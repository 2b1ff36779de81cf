"""Convert an untouched HF GPT-2, check it is unchanged at init, then train it compiled.

python examples/gpt2_convert_compile.py
"""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hcpass


def main() -> None:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=128)
    model = GPT2LMHeadModel(config)
    ids = torch.randint(0, config.vocab_size, (4, 32))

    print(hcpass.explain(model, (ids,)))
    converted = hcpass.convert(model, (ids,), streams=4, manifold="sinkhorn")
    drift = (converted(ids).logits - model(ids).logits).abs().max().item()
    print(f"max |converted - original| at init: {drift:.2e}")

    compiled = torch.compile(converted, backend="hcpass")
    opt = torch.optim.AdamW(converted.parameters(), lr=1e-3)
    for step in range(5):
        loss = compiled(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step}: loss {loss.item():.4f}")


if __name__ == "__main__":
    main()
