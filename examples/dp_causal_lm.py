"""DP fine-tuning of a transformers causal language model (GPT-2 architecture), in full or
with LoRA adapters (peft), on variable-length text with padding and attention masks.

    python examples/dp_causal_lm.py [--lora] [--epochs 2] [--model PATH]

Without --model the model is a small GPT-2 with random weights (no download); --model loads
local weights (a directory saved with save_pretrained). Three things make the training right:

* the model is called without ``labels=``: transformers would average the loss over every
  token of the batch, so one example's gradient would depend on the others' lengths (the
  engine refuses it). ``dpf.CausalLMLoss`` averages over each example's own tokens;
* padding tokens get label -100 and attention mask 0, so they count in neither the loss nor
  the attention;
* with --lora only the adapters train: the frozen base gets no gradient, the adapters' linear
  layers are clipped like any other (`dpf.explain` lists them).
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import torch_dpfast as dpf

TEXT = [
    "differential privacy bounds what a model can reveal about one example.",
    "dp-sgd clips each example's gradient and adds gaussian noise.",
    "poisson sampling makes the accounting match the training.",
    "a checkpoint must not run code when it is loaded.",
    "ghost clipping computes norms without per-example gradients.",
    "book-keeping reuses the backward pass for the clipped sum.",
] * 6
PAD = 0


def encode(lines: list[str], context: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Characters -> ids (1.. ; 0 is padding): (ids (N, context), attention mask, vocab)."""
    chars = sorted(set("".join(lines)))
    ids = torch.full((len(lines), context), PAD)
    mask = torch.zeros(len(lines), context, dtype=torch.long)
    for row, line in enumerate(lines):
        codes = [chars.index(c) + 1 for c in line[:context]]
        ids[row, : len(codes)] = torch.tensor(codes)
        mask[row, : len(codes)] = 1
    return ids, mask, len(chars) + 1


def build_model(vocab: int, context: int, path: str | None, lora: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    if path is not None:
        model = GPT2LMHeadModel.from_pretrained(path)
    else:
        config = GPT2Config(
            vocab_size=vocab,
            n_positions=context,
            n_embd=64,
            n_layer=2,
            n_head=4,
            bos_token_id=None,
            eos_token_id=None,
        )
        model = GPT2LMHeadModel(config)
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
            lora_dropout=0.1,
        )
        model = get_peft_model(model, config)
    return model


def main(argv=None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters only (peft)")
    parser.add_argument("--model", default=None, help="local GPT-2 weights (save_pretrained)")
    parser.add_argument("--context", type=int, default=64)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    ids, mask, vocab = encode(TEXT, args.context)
    labels = ids.masked_fill(mask == 0, -100)  # padding counts in no example's loss
    data = TensorDataset(ids, mask, labels)
    model = build_model(vocab, args.context, args.model, args.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"trainable parameters: {sum(p.numel() for p in trainable):,}")
    engine = dpf.PrivacyEngine()
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.AdamW(trainable, lr=3e-2 if args.lora else 1e-3),
        data_loader=DataLoader(data, batch_size=12),
        noise_multiplier=0.7,
        max_grad_norm=1.0,
        physical_batch_size=6,
    )
    criterion = dpf.CausalLMLoss()  # mean over each example's tokens, then over examples
    loss = float("nan")
    for epoch in range(args.epochs):
        model.train()
        total = batches = 0
        for x, m, y in loader:
            optimizer.zero_grad()
            loss = criterion(model(input_ids=x, attention_mask=m).logits, y)
            loss.backward()
            optimizer.step()
            total, batches = total + float(loss.detach()), batches + 1
        model.eval()
        with torch.no_grad():
            loss = criterion(model(input_ids=ids, attention_mask=mask).logits, labels).item()
        print(
            f"epoch {epoch + 1}: train loss {total / max(batches, 1):.3f}, eval loss {loss:.3f}, "
            f"epsilon {engine.get_epsilon(1e-5):.2f}"
        )
    return loss


if __name__ == "__main__":
    main()
