"""The device side never imports torch, transformers, peft or optimum (only ortft.prepare may)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ortft

HOST_ONLY = ("torch", "transformers", "peft", "optimum")


def device_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(ortft.__path__, prefix="ortft."):
        if info.name.startswith("ortft.prepare"):
            continue
        names.append(info.name)
    return sorted(names)


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            raise ImportError(f'device code imported host-only module {{name}}')
        return None
sys.meta_path.insert(0, Blocker())
import importlib
for module in {modules!r}:
    importlib.import_module(module)
from ortft.runtime import onnxruntime_module
onnxruntime_module().InferenceSession
leaked = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)
assert not leaked, leaked
print('ok', len({modules!r}))
"""


def test_device_modules_import_without_host_libraries():
    modules = device_modules()
    assert "ortft.runtime" in modules and "ortft.cli" in modules
    code = BLOCKER.format(blocked=HOST_ONLY, modules=modules)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_blocker_would_catch_a_host_import():
    code = BLOCKER.format(blocked=HOST_ONLY, modules=["ortft.prepare.source", "ortft.prepare.activations"])
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "host-only module torch" in result.stderr


DOCTOR_WITHOUT_HOST_LIBRARIES = """
import importlib.abc, importlib.machinery, sys
BLOCKED = {blocked!r}
class Refuse(importlib.abc.Loader):  # importing fails as if not installed; find_spec still answers
    def create_module(self, spec):
        raise ImportError(f'No module named {{spec.name!r}} (blocked)')
    def exec_module(self, module):
        pass
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
            return importlib.machinery.ModuleSpec(name, Refuse())
        return None
sys.meta_path.insert(0, Blocker())
from ortft.commands.doctor import collect
facts = collect()
assert facts['training'].startswith('ok'), facts['training']
print('ok')
"""


def test_doctor_reports_training_ok_without_torch():
    """`ortft doctor` on a device (no torch) must report that stock onnxruntime trains, as `train` does."""
    code = DOCTOR_WITHOUT_HOST_LIBRARIES.format(blocked=HOST_ONLY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")
