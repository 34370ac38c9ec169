"""Checkpoint files: written atomically, read without running code.

* :func:`save` writes to a temporary file in the target's directory, flushes and fsyncs it,
  then renames it over the target (``os.replace``, atomic on POSIX and Windows) and fsyncs the
  directory: a kill at any moment leaves either the previous checkpoint or the new one, never
  a truncated file.
* :func:`load` reads with ``torch.load(weights_only=True)``: only tensors, numbers, strings and
  containers of them are rebuilt, so a pickle payload in a crafted file cannot run. A file that
  is missing, truncated, random or not a checkpoint raises :class:`CheckpointError` naming the
  file and what is wrong.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import tempfile
import zipfile

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not hold what was expected."""


def checkpoint_options(options: dict | None, allowed: tuple[str, ...]) -> dict:
    """The keyword arguments of Opacus's ``torch_save_kwargs`` / ``torch_load_kwargs`` that
    keep a checkpoint safe (``allowed``); any other raises, saying why."""
    options = dict(options or {})
    refused = sorted(set(options) - set(allowed))
    if refused:
        raise ValueError(
            f"torch_dpfast: checkpoint option(s) {refused} are not accepted (allowed: "
            f"{list(allowed)}): checkpoints are zip archives read with weights_only=True, so "
            "that loading one cannot run code; weights_only=False, a custom pickle_module or "
            "another pickle_protocol would undo that or make the file unreadable"
        )
    return options


def _is_stream(path) -> bool:
    """A file-like object (Opacus accepts an io.BytesIO as ``path``) rather than a path."""
    return hasattr(path, "write") or hasattr(path, "read")


def save(obj: dict, path) -> None:
    """Writes ``obj`` to ``path`` atomically (module docstring); to a file-like object as is
    (there is nothing to rename)."""
    if _is_stream(path):
        torch.save(obj, path)
        return
    path = pathlib.Path(path)
    directory = path.parent if str(path.parent) else pathlib.Path(".")
    if not directory.is_dir():
        raise CheckpointError(
            f"cannot save the checkpoint {str(path)!r}: the directory {str(directory)!r} does "
            "not exist"
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(obj, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: pathlib.Path) -> None:
    """Makes the rename durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _refused_object(error: Exception) -> str:
    """The line of torch's message that names what was refused (not its advice to load the
    file with weights_only=False)."""
    lines = [line.strip() for line in str(error).splitlines()]
    named = [line for line in lines if line.startswith(("WeightsUnpickler", "Unsupported"))]
    found = (named or lines or ["unreadable pickle"])[0]
    return found.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0]


def load(path, map_location=None, required: tuple[str, ...] = (), mmap: bool | None = None) -> dict:
    """The dict saved at ``path``, rebuilt without running code; ``required`` keys must be in
    it (``path`` may be a file-like object, read from its current position). Raises
    :class:`CheckpointError` for anything else."""
    if _is_stream(path):
        start = path.tell() if hasattr(path, "tell") else 0
        complete = zipfile.is_zipfile(path)
        path.seek(start)
        name = f"<{type(path).__name__}>"
    else:
        path = pathlib.Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {str(path)!r}: no such file")
        complete, name = zipfile.is_zipfile(path), str(path)
    if not complete:  # torch.save writes a zip archive
        raise CheckpointError(
            f"checkpoint {name!r} is truncated, corrupt or not a PyTorch file (no complete zip "
            "archive)"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {name!r} holds objects other than tensors, numbers, strings and "
            f"containers, which are refused because loading them could run code "
            f"({_refused_object(error)}). Only files written by torch_dpfast (save_checkpoint, "
            "dpfast train --save) load"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {name!r} is truncated, corrupt or not a PyTorch file: {error}"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"checkpoint {name!r} holds a {type(checkpoint).__name__}, not a checkpoint dict"
        )
    missing = [key for key in required if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"checkpoint {name!r} lacks {missing}: it was not written by "
            "torch_dpfast's save_checkpoint"
        )
    return checkpoint
