"""Native libraries (LiteRT, FFmpeg inside OpenCV) write to file descriptor 2 directly, past Python's logging,
so their chatter cannot be turned off with a log level. ``filtered_stderr`` catches what is written to fd 2
during one call and passes on every line except those the caller names as noise: nothing else is lost.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from typing import Callable, Iterator

_lock = threading.RLock()  # fd 2 is process-wide: one redirection at a time (nesting is fine)

# LiteRT announces its default CPU delegate once per interpreter; a user can do nothing with it.
XNNPACK_INFO = "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."


def is_litert_info(line: str) -> bool:
    return line.strip() == XNNPACK_INFO


@contextlib.contextmanager
def filtered_stderr(drop: Callable[[str], bool], fd: int = 2) -> Iterator[list[str]]:
    """Inside the block, fd ``fd`` goes to a temporary file; afterwards its lines for which ``drop`` is false
    are written to the real fd. Yields the list of dropped lines (filled when the block ends)."""
    dropped: list[str] = []
    with _lock:
        try:
            sys.stderr.flush()
            saved = os.dup(fd)
        except (OSError, ValueError):  # no fd 2 (embedded interpreter): nothing to filter
            yield dropped
            return
        try:
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), fd)
                try:
                    yield dropped
                finally:
                    try:
                        sys.stderr.flush()
                    except (OSError, ValueError):
                        pass
                    os.dup2(saved, fd)
                    tmp.seek(0)
                    for line in tmp.read().decode("utf-8", "replace").splitlines(keepends=True):
                        if drop(line):
                            dropped.append(line.rstrip("\n"))
                        else:
                            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(saved)
