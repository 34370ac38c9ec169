"""``dpfast train``: DP-SGD (or the non-private baseline) on a data set, end to end.

Defaults train the built-in small CNN on scikit-learn's 8x8 digits (1,438 training and 359
test images) to epsilon = 8 at delta = 1e-5 in 40 epochs (measured on 2 CPU cores: test
accuracy 0.944 at epsilon 7.99 in 39 s; the non-private baseline reaches 0.975).
"""

from __future__ import annotations

import json
import math
import pathlib
import secrets
import time

import torch
from torch import nn
from torch.utils.data import DataLoader

from .. import PrivacyEngine, checkpoint, set_precision
from . import UsageError
from .data import load
from .models import build
from .progress import Progress


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="cnn", help="'cnn' (built in) or any timm model name")
    parser.add_argument("--data", help=".npz file (x, y[, x_test, y_test]) or ImageFolder dir")
    parser.add_argument("--image-size", type=int, help="resize ImageFolder images (default 32)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--noise-multiplier", type=float, help="sigma (instead of --epsilon)")
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=128, help="expected logical batch")
    parser.add_argument("--physical-batch-size", type=int, default=128)
    parser.add_argument(
        "--padding",
        default=None,
        choices=["full", "pow2"],
        help="pad a logical batch's last physical batch to its full size, or to a power of two "
        "(default: pow2 on CPU, full on GPUs)",
    )
    parser.add_argument("--lr", type=float, default=0.3)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument(
        "--clipping", default="auto", choices=["auto", "bk", "ghost", "per_example"]
    )
    parser.add_argument("--accountant", default="prv", choices=["prv", "rdp"])
    parser.add_argument("--precision", default="ieee", choices=["ieee", "tf32", "bf16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--non-private", action="store_true", help="the baseline: plain SGD")
    parser.add_argument(
        "--seed",
        type=int,
        help="make the run reproducible (sampling and noise included: the privacy guarantee "
        "then does not hold against anyone who knows the seed); default: fresh OS randomness",
    )
    parser.add_argument(
        "--secure-mode",
        action="store_true",
        help="draw sampling and noise from the OS CSPRNG (the default without --seed)",
    )
    parser.add_argument("--save", help="checkpoint path, written after every epoch")
    parser.add_argument("--resume", help="checkpoint to continue from (privacy spent included)")
    parser.add_argument("--summary", help="write a JSON summary here")
    parser.set_defaults(run=run)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return device


def _check(args) -> None:
    positive = {
        "--epochs": args.epochs,
        "--batch-size": args.batch_size,
        "--physical-batch-size": args.physical_batch_size,
        "--max-grad-norm": args.max_grad_norm,
        "--lr": args.lr,
        "--epsilon": args.epsilon,
    }
    for flag, value in positive.items():
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{flag} must be a finite number > 0, got {value}")
    if args.image_size is not None and args.image_size < 1:
        raise UsageError(f"--image-size must be >= 1, got {args.image_size}")
    sigma = args.noise_multiplier
    if sigma is not None and not (sigma >= 0 and math.isfinite(sigma)):
        raise UsageError(f"--noise-multiplier must be a finite number >= 0, got {sigma}")
    if not (math.isfinite(args.momentum) and args.momentum >= 0):
        raise UsageError(f"--momentum must be a finite number >= 0, got {args.momentum}")
    if args.secure_mode and args.seed is not None:
        raise UsageError(
            "--secure-mode draws sampling and noise from the OS CSPRNG; --seed would make them "
            "reproducible: give one or the other"
        )
    if not 0 < args.delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {args.delta}")
    if args.save and not pathlib.Path(args.save).resolve().parent.is_dir():
        raise UsageError(
            f"--save {args.save}: the directory {str(pathlib.Path(args.save).parent)!r} does not "
            "exist (checked before training, not after the first epoch)"
        )


def accuracy(model: nn.Module, dataset, device, batch_size: int = 512) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += (model(x.to(device)).argmax(dim=1).cpu() == y).sum().item()
            total += len(y)
    model.train()
    return correct / max(total, 1)


def run(args) -> int:
    _check(args)
    device = _device(args.device)
    set_precision(args.precision)
    torch.manual_seed(args.seed if args.seed is not None else secrets.randbits(63))
    # The train/test split defines the data set; it stays fixed (seed 0) unless --seed is given.
    data = load(args.data, args.test_fraction, args.seed or 0, args.image_size)
    if args.batch_size > len(data.train):
        raise UsageError(
            f"--batch-size {args.batch_size} exceeds the {len(data.train)} training examples"
        )
    model, note = build(args.model, data.channels, data.classes, data.image_size)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loader = DataLoader(data.train, batch_size=args.batch_size, shuffle=args.non_private)
    criterion = nn.CrossEntropyLoss()
    engine = None
    print(
        f"dpfast train: {args.model} on {data.name}: {len(data.train)} training and "
        f"{len(data.test)} test examples, {data.classes} classes, device {device}"
    )
    if note:
        print(f"  note: {note}")
    if args.non_private:
        print("  non-private baseline: plain SGD, no privacy guarantee")
    else:
        engine = PrivacyEngine(accountant=args.accountant, secure_mode=args.seed is None)
        budget = (
            dict(noise_multiplier=args.noise_multiplier)
            if args.noise_multiplier is not None
            else dict(target_epsilon=args.epsilon, target_delta=args.delta, epochs=args.epochs)
        )
        out = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            max_grad_norm=args.max_grad_norm,
            clipping=args.clipping,
            physical_batch_size=args.physical_batch_size,
            padding=args.padding,
            criterion=criterion if args.clipping == "ghost" else None,
            **budget,
        )
        if args.clipping == "ghost":
            model, optimizer, criterion, loader = out
        else:
            model, optimizer, loader = out
        print(
            f"  DP-SGD: sigma {optimizer.noise_multiplier:.3f}, C {args.max_grad_norm}, "
            f"q {engine.sample_rate:.4f}, clipping {args.clipping}, {args.accountant} accountant"
        )
        if args.seed is None:
            print("  sampling and noise: OS CSPRNG (secure mode)")
        else:
            print(
                f"  WARNING: --seed {args.seed} makes sampling and noise reproducible: the "
                "privacy guarantee does not hold against anyone who knows or guesses the seed"
            )
    first_epoch = 0
    if args.resume:
        first_epoch = _resume(args.resume, engine, model, optimizer)
        print(f"  resumed from {args.resume} after epoch {first_epoch}")
    progress = Progress(args.epochs)
    started = time.perf_counter()
    history = []
    for epoch in range(first_epoch, args.epochs):
        total = len(loader)
        loss_sum = examples = 0
        for k, (x, y) in enumerate(loader):
            real = engine.attachment.mask if engine is not None else None  # padding: False
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            logits = model(x)
            loss = criterion(logits, y)
            loss.backward()
            optimizer.step()
            summed, count = _real_loss(loss, logits, y, real)
            loss_sum, examples = loss_sum + summed, examples + count
            eps = history[-1]["epsilon"] if history else (None if engine is None else 0.0)
            progress.update(epoch, k + 1, total, count, loss_sum / max(examples, 1), eps)
        eps = engine.get_epsilon(args.delta) if engine is not None else None
        test_accuracy = accuracy(model, data.test, device)
        history.append(
            dict(
                epoch=epoch + 1,
                loss=loss_sum / max(examples, 1),
                epsilon=eps,
                test_accuracy=test_accuracy,
            )
        )
        progress.epoch_end(epoch, loss_sum / max(examples, 1), eps, test_accuracy)
        if args.save:
            _save(args.save, engine, model, optimizer, epoch + 1)
    seconds = time.perf_counter() - started
    final = history[-1] if history else dict(test_accuracy=accuracy(model, data.test, device))
    eps = engine.get_epsilon(args.delta) if engine is not None else math.inf
    if engine is None:
        print(f"test accuracy {final['test_accuracy']:.4f} (non-private: epsilon = infinity)")
    else:
        print(
            f"test accuracy {final['test_accuracy']:.4f} at (epsilon, delta) = "
            f"({eps:.3f}, {args.delta:g})"
        )
    if args.summary:
        summary = dict(
            arguments={k: v for k, v in vars(args).items() if k != "run"},
            data=data.name,
            test_accuracy=final["test_accuracy"],
            epsilon=eps if engine is not None else None,
            delta=args.delta if engine is not None else None,
            noise_multiplier=optimizer.noise_multiplier if engine is not None else None,
            steps=len(engine.accountant) if engine is not None else None,
            seconds=seconds,
            history=history,
        )
        pathlib.Path(args.summary).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def _real_loss(loss, logits, y, real) -> tuple[float, int]:
    """(sum of the per-example losses of the batch's real rows, their count): the padding rows
    of a physical batch (copies of its first row) are left out of the reported loss."""
    if real is None:
        return float(loss.detach()) * len(y), len(y)
    real = real.to(logits.device)
    with torch.no_grad():
        losses = nn.functional.cross_entropy(logits[real], y[real], reduction="sum")
    return float(losses), int(real.sum())


def _save(path, engine, model, optimizer, epoch: int) -> None:
    if engine is None:
        checkpoint.save(
            dict(
                module_state_dict=model.state_dict(),
                epoch=epoch,
                optimizer_state_dict=optimizer.state_dict(),
            ),
            path,
        )
        return
    engine.save_checkpoint(
        path=path, module=model, optimizer=optimizer, checkpoint_dict=dict(epoch=epoch)
    )


def _resume(path, engine, model, optimizer) -> int:
    if not pathlib.Path(path).exists():
        raise UsageError(f"--resume {path}: no such file")
    try:
        if engine is None:
            saved = checkpoint.load(path, required=("module_state_dict", "optimizer_state_dict"))
            model.load_state_dict(saved["module_state_dict"])
            optimizer.load_state_dict(saved["optimizer_state_dict"])
        else:
            saved = engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
    except checkpoint.CheckpointError as error:
        raise UsageError(f"--resume: {error}") from None
    except (KeyError, RuntimeError, ValueError) as error:
        raise UsageError(
            f"--resume {path}: does not match this run (same model, data, batch size and "
            f"--non-private setting needed): {error}"
        ) from None
    if not isinstance(saved.get("epoch"), int):
        raise UsageError(f"--resume {path}: not a checkpoint of `dpfast train` (no epoch)")
    return saved["epoch"]
