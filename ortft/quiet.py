"""Silence native libraries' stderr (ORT's gradient builder logs every graph transformer at INFO).

`native_stderr_captured()` redirects file descriptor 2 to a temporary file; if the block fails,
the captured tail is written back to stderr so a real error is never hidden.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterator


@contextlib.contextmanager
def native_stderr_captured(enabled: bool = True, tail_lines: int = 40) -> Iterator[None]:
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        failed = False
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if failed:
                capture.seek(0)
                text = capture.read().decode("utf-8", "replace").splitlines()[-tail_lines:]
                if text:
                    sys.stderr.write("\n".join(text) + "\n")
