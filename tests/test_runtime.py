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


_GROWING_BATCHES_SCRIPT = """
import json, os, sys
import numpy as np
from ortft.runtime import TrainingSession

bundle, vocab, lengths = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3].split(",")]
session = TrainingSession(bundle, threads=1)
resident_mb = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
before = resident_mb()
rng = np.random.default_rng(0)
for length in lengths:
    ids = rng.integers(3, vocab, (4, length)).astype(np.int64)
    session.train_step_forward_backward({"input_ids": ids, "attention_mask": np.ones_like(ids),
                                         "position_ids": np.tile(np.arange(length), (4, 1)), "labels": ids.copy()})
    session.optimizer_step(1e-4)
print(json.dumps({"growth_mb": resident_mb() - before}))  # the arena keeps what it took
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_batches_of_changing_shapes_do_not_pile_up_arena_memory(tiny_model_factory, tmp_path):
    """Length-grouped batches change shape every step. 19 steps of growing length must need little more
    memory than one step at the longest length: an arena that grows by exactly each request kept a region
    per new size (this model: 157 MB against 54 for the single step; SmolLM2 on the chat data: +780 MB)."""
    import json
    import subprocess

    from prepare.helpers import prepare_tiny

    model = tiny_model_factory("llama", hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    manifest = prepare_tiny(model, tmp_path / "bundle")

    def growth(lengths: list[int]) -> float:
        result = subprocess.run([sys.executable, "-c", _GROWING_BATCHES_SCRIPT, str(tmp_path / "bundle"),
                                 str(manifest["model"]["vocab_size"]), ",".join(map(str, lengths))],
                                capture_output=True, text=True, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])["growth_mb"]

    longest = growth([192])
    growing = growth(list(range(48, 193, 8)))
    assert longest > 5  # the step's activations are measurable at all
    assert growing <= 1.5 * longest, (growing, longest)
