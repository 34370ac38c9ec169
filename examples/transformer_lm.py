"""A small transformer language model trained with DP-SGD: Embedding, nn.MultiheadAttention,
LayerNorm and a tied output layer, on character-level text.

    python examples/transformer_lm.py [--epochs 2] [--clipping auto|ghost]

Every layer has its own rule (`dpf.explain` lists them): the attention's q/k/v projections get
the linear maths while attention itself runs on the fused scaled_dot_product_attention path.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf

TEXT = (
    "differential privacy bounds what a trained model can reveal about any one example. "
    "dp-sgd clips every example's gradient and adds gaussian noise to their sum. "
    "poisson sampling makes the privacy accounting match the training that was done. "
) * 8


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int = 32, context: int = 16):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        nn.init.normal_(self.embed.weight, std=width**-0.5)  # tied: keep the logits O(1)
        self.position = nn.Embedding(context, width)
        self.attention = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab, bias=False)
        self.out.weight = self.embed.weight  # tied: the norm includes both uses' cross terms
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", mask)

    def forward(self, ids):
        t = ids.shape[1]
        h = self.embed(ids) + self.position(torch.arange(t, device=ids.device)[None])
        a, _ = self.attention(h, h, h, attn_mask=self.causal[:t, :t], need_weights=False)
        return self.out(self.norm(h + a))


def main(argv=None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--clipping", default="auto", choices=["auto", "bk", "ghost", "per_example"]
    )
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    chars = sorted(set(TEXT))
    ids = torch.tensor([chars.index(c) for c in TEXT])
    context = 16
    windows = ids.unfold(0, context + 1, 4)  # (N, context + 1)
    data = TensorDataset(windows[:, :-1], windows[:, 1:])
    model = TinyLM(len(chars), context=context)
    engine = dpf.PrivacyEngine()
    criterion = nn.CrossEntropyLoss()
    out = engine.make_private(
        module=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        data_loader=DataLoader(data, batch_size=32),
        noise_multiplier=0.8,
        max_grad_norm=1.0,
        clipping=args.clipping,
        physical_batch_size=16,
        criterion=criterion if args.clipping == "ghost" else None,
    )
    model, optimizer, loader = (out[0], out[1], out[3]) if len(out) == 4 else out
    loss_fn = out[2] if len(out) == 4 else criterion
    for epoch in range(args.epochs):
        total = batches = 0
        for x, y in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(x).transpose(1, 2), y)  # per-example loss: mean over tokens
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        with torch.no_grad():
            x, y = data.tensors
            eval_loss = F.cross_entropy(model(x).transpose(1, 2), y).item()
        print(
            f"epoch {epoch + 1}: train loss {total / batches:.3f}, eval loss {eval_loss:.3f}, "
            f"epsilon {engine.get_epsilon(1e-5):.2f}"
        )
    return eval_loss


if __name__ == "__main__":
    main()
