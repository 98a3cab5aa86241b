"""A real small filesystem that tests fill up and empty again: a tmpfs mounted for the test.

``mounted_tmpfs`` mounts ``tmpfs`` of the given size on a folder (the tests run as
root); a failed mount fails the test with the reason, it never skips. ``Ballast``
fills the filesystem to the last byte with a file and removes it again.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

CHUNK = 64 * 1024


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str = "3m") -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a {size} tmpfs on {where} for the disk-full test "
                    f"(mount exited {done.returncode}: {done.stderr.strip()}); these tests "
                    "need root (or CAP_SYS_ADMIN) to mount a small filesystem", pytrace=False)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True,
                          check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


class Ballast:
    """A file that takes every free byte of a filesystem, until ``remove``."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "ballast.bin"

    def fill(self) -> int:
        """Write until the filesystem is full (ENOSPC); return the bytes written."""
        written = 0
        with open(self.path, "ab", buffering=0) as handle:
            for size in (CHUNK, 4096, 512, 1):
                block = b"\0" * size
                while True:
                    try:
                        count = handle.write(block)
                    except OSError:
                        break
                    if not count:
                        break
                    written += count
        assert free_bytes(self.path.parent) < 4096, "the filesystem did not fill"
        return written

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize
