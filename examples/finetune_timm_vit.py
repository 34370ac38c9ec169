"""Fine-tune a timm ViT with DP-SGD on an ImageFolder (one subdirectory of images per class).

    python examples/finetune_timm_vit.py --data PATH [--model vit_tiny_patch16_224]
        [--image-size 224] [--epochs 3] [--epsilon 8] [--train-head-only]

Pretrained weights are used when timm can load them (network), else the model starts from
scratch. All ViT parameters are supported, cls_token and pos_embed included (exact per-example
rules). With --train-head-only, everything but the classifier is frozen (the usual DP transfer
recipe, far less noise per useful parameter).
"""

from __future__ import annotations

import argparse

import timm
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

import torch_dpfast as dpf


def main(argv=None) -> float:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--physical-batch-size", type=int, default=16)
    parser.add_argument("--train-head-only", action="store_true")
    parser.add_argument("--pretrained", action="store_true", help="download pretrained weights")
    args = parser.parse_args(argv)

    transform = transforms.Compose(
        [
            transforms.Resize((args.image_size, args.image_size)),
            transforms.ToTensor(),
            transforms.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )
    data = datasets.ImageFolder(args.data, transform=transform)
    model = timm.create_model(
        args.model,
        pretrained=args.pretrained,
        num_classes=len(data.classes),
        img_size=args.image_size,
    )
    if args.train_head_only:
        for p in model.parameters():
            p.requires_grad_(False)
        model.get_classifier().requires_grad_(True)
    print(dpf.explain(model, torch.randn(1, 3, args.image_size, args.image_size)))
    engine = dpf.PrivacyEngine()
    trainable = [p for p in model.parameters() if p.requires_grad]
    model, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.AdamW(trainable, lr=1e-3),
        data_loader=DataLoader(data, batch_size=min(args.batch_size, len(data)), num_workers=2),
        max_grad_norm=1.0,
        target_epsilon=args.epsilon,
        target_delta=1 / (10 * len(data)),
        epochs=args.epochs,
        physical_batch_size=args.physical_batch_size,
    )
    criterion = nn.CrossEntropyLoss()
    for epoch in range(args.epochs):
        correct = seen = 0
        for x, y in loader:
            optimizer.zero_grad()
            logits = model(x)
            criterion(logits, y).backward()
            optimizer.step()
            correct += (logits.argmax(dim=1) == y).sum().item()
            seen += len(y)
        print(
            f"epoch {epoch + 1}: train accuracy {correct / max(seen, 1):.3f} (padding rows "
            f"included), epsilon {engine.get_epsilon(1 / (10 * len(data))):.2f}"
        )
    return engine.get_epsilon(1 / (10 * len(data)))


if __name__ == "__main__":
    main()
