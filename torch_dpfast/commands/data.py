"""Data sets for ``dpfast train``: the bundled 8x8 digits, a user's .npz file or ImageFolder.

Every source becomes a train and a test map-style dataset of float images (C, H, W),
standardised per channel with the training set's mean and std, and integer labels in [0, K).
"""

from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from . import UsageError


@dataclass
class Data:
    name: str
    train: Dataset
    test: Dataset
    channels: int
    classes: int
    image_size: int


def load(path: str | None, test_fraction: float, seed: int, image_size: int | None) -> Data:
    """The data set at ``path`` (None: scikit-learn's digits), split into train and test."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction must be in (0, 1), got {test_fraction}")
    if path is None:
        x, y, x_test, y_test, name = *_digits(), "digits (scikit-learn, 8x8)"
    else:
        p = pathlib.Path(path)
        if p.is_dir():
            return _image_folder(p, test_fraction, seed, image_size or 32)
        if p.suffix != ".npz":
            raise UsageError(
                f"--data {path}: expected a .npz file (arrays x and y) or an ImageFolder "
                "directory (one subdirectory of images per class)"
            )
        if not p.exists():
            raise UsageError(f"--data {path}: no such file")
        x, y, x_test, y_test = _npz(p)
        name = p.name
    if x_test is None:
        x, y, x_test, y_test = _split(x, y, test_fraction, seed)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True).clamp(min=1e-6)
    classes = int(max(y.max(), y_test.max())) + 1
    return Data(
        name,
        TensorDataset((x - mean) / std, y),
        TensorDataset((x_test - mean) / std, y_test),
        x.shape[1],
        classes,
        x.shape[-1],
    )


def _digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError(
            "the default data set (8x8 digits) comes with scikit-learn: pip install "
            "scikit-learn, or pass --data"
        ) from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    return x, torch.tensor(digits.target, dtype=torch.long), None, None


def _npz(path: pathlib.Path):
    try:
        arrays = np.load(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"--data {path}: not a readable .npz file ({error})") from None
    missing = {"x", "y"} - set(arrays.files)
    if missing:
        raise UsageError(
            f"--data {path}: needs arrays 'x' (N, H, W) or (N, C, H, W) images and 'y' (N,) "
            f"integer labels; missing {sorted(missing)} (found {sorted(arrays.files)})"
        )
    x, y = (
        _images(_array(arrays, "x", path), path, "x"),
        _labels(_array(arrays, "y", path), path, "y"),
    )
    if len(x) != len(y):
        raise UsageError(f"--data {path}: x has {len(x)} examples but y has {len(y)} labels")
    if ("x_test" in arrays.files) != ("y_test" in arrays.files):
        raise UsageError(f"--data {path}: give both x_test and y_test, or neither")
    if "x_test" in arrays.files:
        x_test, y_test = (
            _images(_array(arrays, "x_test", path), path, "x_test"),
            _labels(_array(arrays, "y_test", path), path, "y_test"),
        )
        if x_test.shape[1:] != x.shape[1:]:
            raise UsageError(
                f"--data {path}: x_test images {tuple(x_test.shape[1:])} differ from x's "
                f"{tuple(x.shape[1:])}"
            )
        return x, y, x_test, y_test
    return x, y, None, None


def _array(arrays, key: str, path) -> np.ndarray:
    """One array of the .npz, read without unpickling (object arrays are refused)."""
    try:
        return arrays[key]
    except (ValueError, OSError, EOFError) as error:
        raise UsageError(
            f"--data {path}: array '{key}' cannot be read ({error}); save numeric arrays "
            "(object arrays are refused: loading them would unpickle)"
        ) from None


def _images(array, path, key) -> torch.Tensor:
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4 or array.shape[1] > 4:
        raise UsageError(
            f"--data {path}: '{key}' must be (N, H, W) or (N, C, H, W) with C <= 4, got "
            f"shape {array.shape}"
        )
    if not np.issubdtype(array.dtype, np.number):
        raise UsageError(f"--data {path}: '{key}' must be numeric, got {array.dtype}")
    x = torch.tensor(array, dtype=torch.float32)
    if array.dtype == np.uint8:
        x = x / 255.0
    if not torch.isfinite(x).all():
        raise UsageError(f"--data {path}: '{key}' contains NaN or infinite values")
    return x


def _labels(array, path, key) -> torch.Tensor:
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer) or array.min() < 0:
        raise UsageError(
            f"--data {path}: '{key}' must be a 1-D array of integer labels >= 0, got dtype "
            f"{array.dtype} and shape {array.shape}"
        )
    return torch.tensor(array, dtype=torch.long)


def _split(x, y, test_fraction, seed):
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(len(x) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    if len(train) < 2:
        raise UsageError(f"the data set has {len(x)} examples: too few to train on")
    return x[train], y[train], x[test], y[test]


def _check_images(folder, root) -> None:
    """Every image of the folder opens (checked before training, not in its middle)."""
    from PIL import Image, UnidentifiedImageError

    for path, _ in folder.samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
            raise UsageError(f"--data {root}: image {path} cannot be read ({error})") from None


def _image_folder(root: pathlib.Path, test_fraction: float, seed: int, size: int) -> Data:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise UsageError(
            "--data DIRECTORY (an ImageFolder) needs torchvision: pip install torchvision"
        ) from None
    transform = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize([0.5, 0.5, 0.5], [0.25, 0.25, 0.25]),
        ]
    )
    try:
        folder = datasets.ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:
        raise UsageError(f"--data {root}: not an ImageFolder directory ({error})") from None
    _check_images(folder, root)
    perm = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed)).tolist()
    n_test = max(1, round(len(folder) * test_fraction))
    return Data(
        f"ImageFolder {root}",
        Subset(folder, perm[n_test:]),
        Subset(folder, perm[:n_test]),
        3,
        len(folder.classes),
        size,
    )
