"""Adapter files and their checks against a bundle's trainable tensors (ortft/adapter.py)."""

from __future__ import annotations

import numpy as np
import pytest

from ortft.adapter import adapter_bytes, check_adapter, load_adapter, read_initial_adapter
from ortft.errors import ConfigError, RunError

MANIFEST = {"trainable": [{"name": "a.lora_A", "shape": [2, 3]}, {"name": "a.lora_B", "shape": [3, 2]}]}


def adapter(scale: float = 1.0) -> dict[str, np.ndarray]:
    return {"a.lora_A": np.full((2, 3), scale, np.float32), "a.lora_B": np.arange(6, dtype=np.float32).reshape(3, 2)}


def test_adapter_bytes_round_trip_as_float32(tmp_path):
    path = tmp_path / "adapter.safetensors"
    path.write_bytes(adapter_bytes({name: value.astype(np.float64) for name, value in adapter(2.0).items()}))
    loaded = load_adapter(path)
    assert sorted(loaded) == ["a.lora_A", "a.lora_B"] and all(value.dtype == np.float32 for value in loaded.values())
    np.testing.assert_array_equal(loaded["a.lora_A"], adapter(2.0)["a.lora_A"])


@pytest.mark.parametrize("change, fragment", [
    (lambda a: a.pop("a.lora_B"), "a.lora_B missing"),
    (lambda a: a.update({"extra": np.zeros(1, np.float32)}), "extra is not one of the bundle's trainable tensors"),
    (lambda a: a.update({"a.lora_A": np.zeros((3, 2), np.float32)}), "a.lora_A has shape [3, 2], expected [2, 3]"),
    (lambda a: a["a.lora_A"].__setitem__((0, 0), np.nan), "a.lora_A"),
])
def test_check_adapter_names_what_does_not_fit(change, fragment):
    check_adapter(MANIFEST, adapter())
    bad = adapter()
    change(bad)
    with pytest.raises(RunError, match="my file") as caught:
        check_adapter(MANIFEST, bad, where="my file")
    assert fragment in caught.value.message


def test_read_initial_adapter(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        read_initial_adapter(MANIFEST, tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    good.write_bytes(adapter_bytes(adapter()))
    assert sorted(read_initial_adapter(MANIFEST, good)) == ["a.lora_A", "a.lora_B"]
    wrong = tmp_path / "wrong.safetensors"
    wrong.write_bytes(adapter_bytes({"a.lora_A": np.zeros((2, 3), np.float32)}))
    with pytest.raises(RunError, match="a.lora_B missing"):
        read_initial_adapter(MANIFEST, wrong)
