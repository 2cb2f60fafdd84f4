"""Freeing the disk space of a file's start while another process goes on appending to it.

Envoy appends every request to its access-log file and never rotates it; costsink reads it
behind the gRPC stream. Renaming the file away or truncating it (logrotate) races with Envoy's
writes: the lines written between costsink's last read and the cut would be lost. Punching a
hole (Linux `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`) gives the blocks of a range
back to the filesystem and leaves every offset as it was: Envoy's next write lands where it
would have, costsink's checkpoint stays valid, and the range reads as zeros. ext4, XFS, Btrfs
and tmpfs support it; where the filesystem or the platform does not, `punch_hole` raises
OSError and the file keeps its space.

No maintained library wraps this call (the standard library has `posix_fallocate`, which only
allocates), hence ctypes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_fallocate = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate is not None:
    _fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate.restype = ctypes.c_int


def punch_hole(fd: int, start: int, end: int) -> None:
    """Give back the blocks of [start, end) of the file open for writing at `fd`; its size and
    what lies outside the range are unchanged. Raises OSError (EOPNOTSUPP where it cannot)."""
    if _fallocate is None:
        raise OSError(errno.EOPNOTSUPP, "fallocate is not available on this platform")
    if _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, end - start) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def allocated_bytes(st: os.stat_result) -> int:
    """The disk a file takes (its blocks), which for a file with holes is less than its size."""
    return int(st.st_blocks) * 512
