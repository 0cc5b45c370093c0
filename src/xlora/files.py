"""Safe file handling for the core and every wing: atomic writes (to a temporary file in the same folder,
then renamed over the target), and the check that tensors read from a file are finite."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path``; nothing is left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 (and a writer may replace the file): the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def output_folder(flag: str, path: str | os.PathLike) -> Path:
    """The folder ``path`` a command will write to, checked before any long work (nothing is created): a file
    there, or a place where no folder can be made or written, is refused naming ``flag`` (instead of failing after
    the work and losing it)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {str(folder)!r} is a file, not a folder; give a folder (created if missing)")
    parent = folder
    while not parent.exists() and parent != parent.parent:  # the nearest existing folder above it
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{flag} {str(folder)!r}: cannot create the folder ({str(parent)!r} is a file); choose a "
                         "writable path")
    if not os.access(parent, os.W_OK | os.X_OK):
        what = "is not writable" if parent == folder else f"cannot be created ({str(parent)!r} is not writable)"
        raise ValueError(f"{flag} {str(folder)!r} {what}; choose a writable path")
    return folder


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_finite(tensor: torch.Tensor, what: str, fix: str) -> None:
    """Raise ``ValueError`` naming ``what`` when ``tensor`` holds NaN or ±Inf (a corrupt or diverged file)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        kind = "NaN" if bool(torch.isnan(tensor).any()) else "Inf"
        raise ValueError(f"{what} holds {bad} non-finite value(s) ({kind} among them, of {tensor.numel()}); {fix}")
