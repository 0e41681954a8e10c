"""ortft/runtime.py: the training session over a bundle."""

from __future__ import annotations

import errno

import pytest


def test_checkpoint_written_by_ort_to_a_full_device_is_an_os_error(tiny_llama, tmp_path):
    """ORT's own checkpoint writer on /dev/full (every write fails with ENOSPC) raises a RuntimeError
    that says "errno:28"; `save` makes it the OSError that `ortft train` reports as a full disk."""
    from prepare.helpers import prepare_tiny

    from ortft.runtime import TrainingSession

    prepare_tiny(tiny_llama, tmp_path / "bundle")
    session = TrainingSession(tmp_path / "bundle", threads=1)
    with pytest.raises(OSError) as caught:
        session.save("/dev/full")
    assert caught.value.errno == errno.ENOSPC
    session.save(tmp_path / "checkpoint")  # the same session still saves where there is room
    assert (tmp_path / "checkpoint").stat().st_size > 0
