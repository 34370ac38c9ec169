"""The training harness shared by throughput.py, max_batch.py and profile.py.

One :class:`Run` = one model, one training mode, one precision and one physical batch size on
synthetic CIFAR-100-shaped data (seeded 32x32 images with 100 classes, no downloads) resized to
the model's input size on the device. Every mode trains the same way the user would:

* ``non_private``: shuffled physical batches of ``physical`` rows; the gradients of
  ceil(logical / physical) of them are accumulated into one optimizer step;
* ``dpfast_<clipping>``: ``dpf.PrivacyEngine.make_private`` with true Poisson logical batches
  of expected size ``logical``, cut into fixed-shape masked physical batches (``_pow2``: with
  ``padding="pow2"``, the last physical batch of each logical batch padded only to the next
  power of two);
* ``opacus_hooks`` / ``opacus_ghost``: Opacus's ``PrivacyEngine.make_private`` (Poisson
  sampling) with its logical batches cut into physical batches of at most ``physical`` rows
  the way Opacus's BatchMemoryManager does (skipped optimizer steps between them).

:meth:`Run.logical_steps` yields, per logical step, the real examples it processed (padding
rows excluded), the rows it ran through the model (padding included) and its wall time (CUDA
synchronised). ``Run.phase(name)`` wraps the "forward",
"backward" and "step" phases of every physical batch (a no-op unless profile.py replaces it).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Ablations: our modes with the norm certification (torch_dpfast/certify.py) switched off, to
# measure its cost side by side. Not private against crafted inputs; never in a default run.
UNCERTIFIED = ("dpfast_auto_uncertified", "dpfast_bk_uncertified", "dpfast_ghost_uncertified")
OURS = (
    "dpfast_auto",
    "dpfast_auto_pow2",
    "dpfast_bk",
    "dpfast_ghost",
    "dpfast_per_example",
    *UNCERTIFIED,
)
OPACUS = ("opacus_hooks", "opacus_ghost")
MODES = ("non_private", *OURS, *OPACUS)
DEFAULT_MODES = tuple(m for m in MODES if m not in UNCERTIFIED)
PRECISIONS = ("fp32", "tf32", "bf16")

# name -> (timm model name or None for a hand-built one, input size, label). The paper's
# Table 1 (ViT tiny..huge, BiT-ResNet 50x1..152x4), timm's ResNet-18 with GroupNorm (a
# stock torchvision-style ResNet with in-place ops) and two tiny models for CPU smoke runs.
MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", 224, "ViT-Ti/16"),
    "vit_small": ("vit_small_patch16_224", 224, "ViT-S/16"),
    "vit_base": ("vit_base_patch16_224", 224, "ViT-B/16"),
    "vit_large": ("vit_large_patch16_224", 224, "ViT-L/16"),
    "vit_huge": ("vit_huge_patch14_224", 224, "ViT-H/14"),
    "bit_50x1": ("resnetv2_50x1_bit", 224, "BiT-R50x1"),
    "bit_101x1": ("resnetv2_101x1_bit", 224, "BiT-R101x1"),
    "bit_50x3": ("resnetv2_50x3_bit", 224, "BiT-R50x3"),
    "bit_101x3": ("resnetv2_101x3_bit", 224, "BiT-R101x3"),
    "bit_152x4": ("resnetv2_152x4_bit", 224, "BiT-R152x4"),
    "convnext_atto": ("convnext_atto", 224, "ConvNeXt-atto"),
    "eva02_tiny": ("eva02_tiny_patch14_224", 224, "EVA-02-Ti/14"),
    "swin_tiny": ("swin_tiny_patch4_window7_224", 224, "Swin-T"),
    "resnet18_gn": (None, 224, "ResNet-18 (GroupNorm)"),
    "smoke_vit": (None, 32, "tiny ViT (2 blocks, 32x32)"),
    "smoke_bit": (None, 32, "tiny BiT ResNetV2 (4 blocks, 32x32)"),
    "char_lstm": (None, 64, "char-LSTM (embedding 64, 2-layer LSTM 128, 64 steps)"),
    "gpt2_lm": (None, 128, "GPT-2-style causal LM (HF GPT-2: 6 layers, d 384, 128 tokens)"),
    "mobilenetv3": ("mobilenetv3_large_100", 224, "MobileNetV3-L (dpf.fix: GroupNorm)"),
    "efficientnet_b0": ("efficientnet_b0", 224, "EfficientNet-B0 (dpf.fix: GroupNorm)"),
}
NUM_CLASSES = 100
SEQUENCE_MODELS = {"char_lstm", "gpt2_lm"}  # take token ids (B, T) instead of images
LANGUAGE_MODELS = {"gpt2_lm"}  # next-token labels (B, T): the loss averages each example's
FIXED_MODELS = {"mobilenetv3", "efficientnet_b0"}  # BatchNorm replaced by dpf.fix (all modes)
VOCAB = 128


class CharLSTM(nn.Module):
    """Opacus's char-LSTM classifier shape: embedding, a 2-layer LSTM, a head on the last step.
    ``lstm`` is nn.LSTM, or Opacus's DPLSTM for the Opacus modes (Opacus cannot clip nn.LSTM)."""

    def __init__(self, lstm: type = nn.LSTM):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 64)
        self.lstm = lstm(64, 128, num_layers=2, batch_first=True)
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


class CausalLM(nn.Module):
    """HF GPT-2 (tied embedding and head, Conv1D projections, learned positions) over a
    character vocabulary; returns logits (B, VOCAB, T) for nn.CrossEntropyLoss against (B, T)
    next-token labels (per example: the mean over its tokens, all sequences full length)."""

    def __init__(self, length: int):
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=VOCAB, n_positions=length, n_embd=384, n_layer=6, n_head=6,
            bos_token_id=0, eos_token_id=0, attn_implementation="sdpa",
        )  # fmt: skip
        self.lm = GPT2LMHeadModel(config)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits.transpose(1, 2)


def dpfast_options(mode: str) -> tuple[str, str]:
    """(clipping, padding) of one of our modes: "dpfast_auto_pow2" -> ("auto", "pow2")."""
    mode = mode.removesuffix("_uncertified")
    clipping, pow2, _ = mode.removeprefix("dpfast_").partition("_pow2")
    return clipping, "pow2" if pow2 else "full"


def uncertified_check(record, x, g, norm_sq, bound=None):
    """certify.check with the certification off: every fast-path norm taken as it is, no bound
    computed (one a kernel gave with the norm ignored), nothing recomputed (the UNCERTIFIED
    ablations and certify_cost.py only)."""
    return norm_sq, torch.zeros(norm_sq.shape, dtype=torch.bool, device=norm_sq.device)


def _switch_off_certification() -> None:
    """For the UNCERTIFIED ablations only (this benchmark process)."""
    from torch_dpfast import certify

    certify.check = uncertified_check


def build_model(name: str, opacus: bool = False) -> nn.Module:
    """A freshly initialised model with a 100-class head (no pretrained weights); with
    ``opacus``, the variant Opacus can train (DPLSTM for nn.LSTM)."""
    import timm

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if name == "char_lstm":
        if opacus:
            from opacus.layers import DPLSTM

            return CharLSTM(DPLSTM)
        return CharLSTM()
    timm_name, size, _ = MODELS[name]
    if name == "gpt2_lm":
        return CausalLM(size)
    if name in FIXED_MODELS:
        import torch_dpfast as dpf

        model = timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES)
        return dpf.fix(model)
    if timm_name is not None:
        return timm.create_model(timm_name, pretrained=False, num_classes=NUM_CLASSES)
    if name == "resnet18_gn":
        return timm.create_model(
            "resnet18", num_classes=NUM_CLASSES, norm_layer=lambda c, **kw: nn.GroupNorm(8, c)
        )
    if name == "smoke_vit":
        return timm.create_model(
            "vit_tiny_patch16_224", img_size=size, patch_size=8, depth=2, num_classes=NUM_CLASSES
        )
    from timm.layers import GroupNormAct
    from timm.models.resnetv2 import ResNetV2

    return ResNetV2(
        layers=[1, 1, 1, 1],
        channels=(32, 64, 128, 256),
        stem_chs=16,
        num_classes=NUM_CLASSES,
        norm_layer=functools.partial(GroupNormAct, num_groups=8),
    )


def synthetic_tokens(num_examples: int, length: int, seed: int = 0) -> TensorDataset:
    """(token ids (N, length) in [0, VOCAB), labels (N,) in [0, 100)), seeded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (num_examples, length), generator=g)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=g)
    return TensorDataset(ids, labels)


def synthetic_text(num_examples: int, length: int, seed: int = 0) -> TensorDataset:
    """(token ids (N, length), next-token labels (N, length)) from one seeded stream each."""
    g = torch.Generator().manual_seed(seed)
    stream = torch.randint(0, VOCAB, (num_examples, length + 1), generator=g)
    return TensorDataset(stream[:, :-1].contiguous(), stream[:, 1:].contiguous())


def synthetic_cifar100(num_examples: int, seed: int = 0) -> TensorDataset:
    """(uint8 images (N, 3, 32, 32), labels (N,) in [0, 100)), seeded."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (num_examples, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (num_examples,), generator=g)
    return TensorDataset(images, labels)


def set_precision(precision: str) -> None:
    """fp32: TF32 off; tf32: TF32 tensor cores for float32 matmuls and convolutions; bf16: as
    tf32, and the forward under bfloat16 autocast (see :class:`Run`)."""
    import torch_dpfast as dpf

    dpf.set_precision({"fp32": "ieee", "tf32": "tf32", "bf16": "bf16"}[precision])


@dataclass
class Settings:
    model: str
    mode: str
    precision: str = "fp32"
    physical: int = 8  # rows per physical batch
    logical: int = 16  # (expected) examples per logical batch
    device: str = "cpu"
    dataset_size: int = 0  # default: 8 logical batches' worth
    seed: int = 0  # of the model, the data and the sampling

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose from {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.physical < 1 or self.logical < 1:
            raise ValueError("physical and logical batch sizes must be >= 1")
        self.dataset_size = self.dataset_size or 8 * self.logical


class Run:
    """A model, its optimizer and its data loader set up for ``settings.mode``."""

    def __init__(self, settings: Settings):
        self.settings = s = settings
        torch.manual_seed(s.seed)
        self.device = torch.device(s.device)
        set_precision(s.precision)
        self.autocast = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if s.precision == "bf16"
            else contextlib.nullcontext()
        )
        self.input_size = MODELS[s.model][1]
        model = build_model(s.model, opacus=s.mode in OPACUS).to(self.device)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if s.model in LANGUAGE_MODELS:
            dataset = synthetic_text(s.dataset_size, self.input_size, s.seed)
        elif s.model in SEQUENCE_MODELS:
            dataset = synthetic_tokens(s.dataset_size, self.input_size, s.seed)
        else:
            dataset = synthetic_cifar100(s.dataset_size, s.seed)
        loader = DataLoader(dataset, batch_size=s.logical)  # q = logical / dataset_size
        self.criterion = nn.CrossEntropyLoss()
        self.model, self.optimizer = model, optimizer
        self.phase = lambda name: contextlib.nullcontext()
        if s.mode == "non_private":
            self.loader = DataLoader(dataset, batch_size=s.physical, shuffle=True, drop_last=True)
        else:
            self._make_private(loader)

    def _make_private(self, loader: DataLoader) -> None:
        """Our or Opacus's make_private with sigma = 1, C = 1 and Poisson sampling."""
        ours = self.settings.mode in OURS
        if ours:
            from torch_dpfast import PrivacyEngine

            if self.settings.mode in UNCERTIFIED:
                _switch_off_certification()
            clipping, padding = dpfast_options(self.settings.mode)
            options = dict(
                clipping=clipping, physical_batch_size=self.settings.physical, padding=padding
            )
        else:
            from opacus import PrivacyEngine

            clipping = self.settings.mode.removeprefix("opacus_")
            options = dict(grad_sample_mode=clipping, poisson_sampling=True)
        self.engine = PrivacyEngine()
        out = self.engine.make_private(
            module=self.model,
            optimizer=self.optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            criterion=self.criterion if clipping == "ghost" or not ours else None,
            **options,
        )
        if clipping == "ghost":
            self.model, self.optimizer, self.criterion, self.loader = out
        else:
            self.model, self.optimizer, self.loader = out
        if ours:  # what the loader knows about each physical batch (its mask)
            self._batch_info = []
            forward = self.loader.on_batch
            self.loader.on_batch = lambda info: (self._batch_info.append(info), forward(info))

    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, 32, 32) -> normalised float (B, 3, S, S) on the device; token ids
        (B, T) as they are."""
        if images.dtype != torch.uint8:
            return images.to(self.device, non_blocking=True)
        x = images.to(self.device, non_blocking=True).float().div_(255.0).sub_(0.5).div_(0.25)
        if self.input_size != x.shape[-1]:
            x = F.interpolate(x, size=self.input_size, mode="bilinear", align_corners=False)
        return x

    def _backward(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        with self.phase("forward"), self.autocast:
            loss = self.criterion(self.model(self._inputs(images)), labels.to(self.device))
        with self.phase("backward"):
            loss.backward()

    def _step(self) -> None:
        with self.phase("step"):
            self.optimizer.step()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def logical_steps(self, count: int) -> Iterator[tuple[int, int, float]]:
        """Trains ``count`` logical steps; yields (real examples, rows, seconds) for each."""
        steps = {
            "non_private": self._steps_non_private,
            "opacus_hooks": self._steps_opacus,
            "opacus_ghost": self._steps_opacus,
        }.get(self.settings.mode, self._steps_dpfast)
        produced = 0
        while produced < count:  # one pass over the loader per epoch
            for item in steps():
                yield item
                produced += 1
                if produced == count:
                    return

    def _steps_non_private(self) -> Iterator[tuple[int, int, float]]:
        per_step = math.ceil(self.settings.logical / self.settings.physical)
        batches = iter(self.loader)
        while True:
            self._sync()
            start = time.perf_counter()
            self.optimizer.zero_grad(set_to_none=True)
            for _ in range(per_step):
                images, labels = next(batches, (None, None))
                if images is None:
                    return
                self._backward(images, labels)
            self._step()
            self._sync()
            rows = per_step * self.settings.physical
            yield rows, rows, time.perf_counter() - start

    def _steps_dpfast(self) -> Iterator[tuple[int, int, float]]:
        self._sync()
        start, examples, rows = time.perf_counter(), 0, 0
        for images, labels in self.loader:
            info = self._batch_info.pop()
            self.optimizer.zero_grad(set_to_none=True)
            self._backward(images, labels)
            self._step()
            examples += int(info.mask.sum())
            rows += len(info.mask)
            if info.last:
                self._sync()
                yield examples, rows, time.perf_counter() - start
                self._sync()
                start, examples, rows = time.perf_counter(), 0, 0

    def _steps_opacus(self) -> Iterator[tuple[int, int, float]]:
        physical = self.settings.physical
        self._sync()
        start = time.perf_counter()
        for images, labels in self.loader:
            chunks = max(1, math.ceil(len(images) / physical))
            for k in range(chunks):
                self.optimizer.zero_grad(set_to_none=True)
                part = slice(k * physical, (k + 1) * physical)
                if len(images):
                    self._backward(images[part], labels[part])
                self.optimizer.signal_skip_step(do_skip=k < chunks - 1)
                self._step()
            self._sync()
            yield len(images), len(images), time.perf_counter() - start  # chunks are not padded
            self._sync()
            start = time.perf_counter()


def peak_memory_mib(device: torch.device) -> float:
    """Peak CUDA memory allocated by torch (CUDA) or peak resident set size (CPU), MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
