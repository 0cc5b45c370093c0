"""Safe file handling (xlora.files): output folders checked before the work, atomic writes with the usual mode."""

from __future__ import annotations

import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from xlora.files import atomic_save_safetensors, atomic_write_text, output_folder


def test_output_folder_is_checked_without_being_created_and_a_file_or_blocked_path_refused(tmp_path):
    assert output_folder("--out", tmp_path / "a" / "b") == tmp_path / "a" / "b" and not (tmp_path / "a").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"^--out '.*f' is a file, not a folder"):
        output_folder("--out", tmp_path / "f")
    with pytest.raises(ValueError, match=r"^--dst '.*f/sub': cannot create the folder"):
        output_folder("--dst", tmp_path / "f" / "sub")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_written_files_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    """A server or mistral.rs running as another user must be able to read a saved model."""
    old = os.umask(0o022)
    try:
        atomic_save_safetensors(tmp_path / "h.safetensors", {"w": torch.arange(4.0)})
        atomic_write_text(tmp_path / "c.json", "{}")
    finally:
        os.umask(old)
    for name in ("h.safetensors", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
    assert torch.equal(load_file(str(tmp_path / "h.safetensors"))["w"], torch.arange(4.0))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
