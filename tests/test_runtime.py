"""ortft/runtime.py: the training session over a bundle."""

from __future__ import annotations

import sys

import numpy as np
import pytest


def _loss(outputs) -> float:
    return float(np.asarray(outputs[0] if isinstance(outputs, (list, tuple)) else outputs))


def test_micro_batch_gradients_are_summed_and_reset_by_the_optimizer_step(tiny_llama, tmp_path):
    """Two micro-batches before one step: the gradients are the sum of each batch's own (bound outputs
    are overwritten per run, so the runtime must add them), and the step starts the next sum afresh."""
    from helpers.bundles import prepare_tiny
    from helpers.reference import batch_for

    from ortft.runtime import TrainingSession

    manifest = prepare_tiny(tiny_llama, tmp_path / "bundle")
    first, second = batch_for(manifest, seed=1), batch_for(manifest, seed=5)
    session = TrainingSession(tmp_path / "bundle", threads=1)
    session.train_step_forward_backward(first)
    alone_first = session.gradients()
    session.micro_batches = 0  # forget them, without a step
    session.train_step_forward_backward(second)
    alone_second = session.gradients()
    session.micro_batches = 0
    session.train_step_forward_backward(first)
    session.train_step_forward_backward(second)
    summed = session.gradients()
    assert any(np.abs(value).max() > 0 for value in alone_first.values())
    for name in summed:
        np.testing.assert_allclose(summed[name], alone_first[name] + alone_second[name], rtol=1e-5, atol=1e-7, err_msg=name)
    session.optimizer_step(1e-3)
    assert session.micro_batches == 0
    session.train_step_forward_backward(first)
    assert session.micro_batches == 1


def test_parameters_are_bound_without_copies(tiny_llama, tmp_path):
    """The training graph reads the parameter buffers themselves: a value set between two runs is what
    the next run sees (the loss changes), and setting the old value back gives the old loss exactly."""
    from helpers.bundles import prepare_tiny
    from helpers.reference import batch_for

    from ortft.runtime import TrainingSession

    manifest = prepare_tiny(tiny_llama, tmp_path / "bundle")
    session = TrainingSession(tmp_path / "bundle", threads=1, with_optimizer=False)
    batch = batch_for(manifest)
    name = next(entry["name"] for entry in manifest["trainable"] if "lora_B" in entry["name"])
    original = session.parameter(name).copy()
    before = _loss(session.evaluate(batch))
    session.set_parameter(name, original + 0.5)
    assert _loss(session.evaluate(batch)) != before
    session.set_parameter(name, original)
    assert _loss(session.evaluate(batch)) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; nothing is dropped elsewhere")
def test_release_idle_memory_unmaps_the_frozen_weights_pages(tiny_llama, tmp_path):
    """Both sessions map frozen_weights.data, and RSS counts each mapping: after an evaluation, the eval
    session's pages would sit on top of the next training step's peak. release_idle_memory drops them;
    they read back from the page cache, unchanged."""
    from helpers.bundles import prepare_tiny
    from helpers.reference import batch_for
    from helpers.memory import resident_kb

    from ortft.runtime import FROZEN_DATA, TrainingSession

    manifest = prepare_tiny(tiny_llama, tmp_path / "bundle")
    session = TrainingSession(tmp_path / "bundle", threads=1)
    batch = batch_for(manifest)
    session.train_step_forward_backward(batch)
    before = _loss(session.evaluate(batch))
    store = tmp_path / "bundle" / FROZEN_DATA
    assert resident_kb(store) * 1024 >= 0.9 * manifest["frozen_weights"]["bytes"]
    session.release_idle_memory()
    assert resident_kb(store) < 64
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

    from helpers.bundles import prepare_tiny

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
