"""ortft/runtime.py: the training session over a bundle."""

from __future__ import annotations

import errno
import sys

import numpy as np
import pytest


def _loss(outputs) -> float:
    return float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; nothing is dropped elsewhere")
def test_release_idle_memory_unmaps_the_frozen_weights_pages(tiny_llama, tmp_path):
    """Both sessions map frozen_weights.data, and RSS counts each mapping: after an evaluation, the eval
    session's pages would sit on top of the next training step's peak. release_idle_memory drops them;
    they read back from the page cache, unchanged."""
    from prepare.helpers import batch_for, prepare_tiny
    from test_memory import _resident_kb

    from ortft.runtime import FROZEN_DATA, TrainingSession

    manifest = prepare_tiny(tiny_llama, tmp_path / "bundle")
    session = TrainingSession(tmp_path / "bundle", threads=1)
    batch = batch_for(manifest)
    session.train_step_forward_backward(batch)
    before = _loss(session.evaluate(batch))
    store = tmp_path / "bundle" / FROZEN_DATA
    assert _resident_kb(store) * 1024 >= 0.9 * manifest["frozen_weights"]["bytes"]
    session.release_idle_memory()
    assert _resident_kb(store) < 64
    assert _loss(session.evaluate(batch)) == before
