"""Tests for ortft.providers: the execution-provider registry, option parsing and resolution rules.

ORT's reported providers are faked through `_ort_provider_names`, so accelerators can be tested on CPU.
"""

from __future__ import annotations

import logging

import click
import pytest
from click.testing import CliRunner

from ortft import providers
from ortft.errors import ProviderError, UserError


@pytest.fixture(autouse=True)
def fresh_registry():
    providers.reset_registry()
    yield
    providers.reset_registry()


@pytest.fixture
def fake_ort(monkeypatch):
    """Pretend onnxruntime reports exactly the given ORT provider names."""

    def install(*ort_names: str) -> None:
        monkeypatch.setattr(providers, "_ort_provider_names", lambda: list(ort_names))

    return install


def test_builtin_entries_have_ort_names_and_training_flags():
    table = providers.registered_providers()
    expected = {
        "cpu": "CPUExecutionProvider",
        "cuda": "CUDAExecutionProvider",
        "openvino": "OpenVINOExecutionProvider",
        "directml": "DmlExecutionProvider",
        "qnn": "QNNExecutionProvider",
        "vitisai": "VitisAIExecutionProvider",
        "tensorrt": "TensorrtExecutionProvider",
        "coreml": "CoreMLExecutionProvider",
        "rocm": "ROCMExecutionProvider",
    }
    assert {name: spec.ort_name for name, spec in table.items()} == expected
    assert all(spec.can_train for spec in table.values())  # standard-ONNX training graphs run anywhere
    assert all(spec.description for spec in table.values())
    assert "config_file" in table["vitisai"].required_options


def test_real_ort_build_reports_cpu():
    assert "cpu" in providers.available_providers()
    assert providers.resolve_for_training("cpu") == [("CPUExecutionProvider", {})]
    assert providers.describe_providers(providers.resolve_for_training("cpu")) == "cpu"


def test_available_providers_maps_to_short_names_and_keeps_unknown_ort_names(fake_ort):
    fake_ort("CUDAExecutionProvider", "AzureExecutionProvider", "CPUExecutionProvider")
    assert providers.available_providers() == ["cuda", "AzureExecutionProvider", "cpu"]


@pytest.mark.parametrize(
    "text, name, options",
    [
        ("cpu", "cpu", {}),
        ("vitisai:config_file=/opt/vaip.json", "vitisai", {"config_file": "/opt/vaip.json"}),
        ("cuda:device_id=1, gpu_mem_limit=1024", "cuda", {"device_id": "1", "gpu_mem_limit": "1024"}),
        (r"vitisai:config_file=C:\ryzen\vaip.json", "vitisai", {"config_file": r"C:\ryzen\vaip.json"}),
        ("openvino:", "openvino", {}),
    ],
)
def test_parse_provider_request(text, name, options):
    request = providers.parse_provider_request(text)
    assert request.name == name
    assert dict(request.options) == options


@pytest.mark.parametrize("text", ["", ":device_id=1", "cuda:device_id", "cuda:=3"])
def test_parse_provider_request_rejects_malformed_text(text):
    with pytest.raises(ProviderError):
        providers.parse_provider_request(text)


def test_training_refuses_unknown_provider_and_lists_available(fake_ort):
    fake_ort("CPUExecutionProvider")
    with pytest.raises(ProviderError) as caught:
        providers.resolve_for_training("tpu")
    assert isinstance(caught.value, UserError)
    assert "'tpu'" in caught.value.message
    assert "available in this onnxruntime build: cpu" in caught.value.message


def test_accelerators_train_with_cpu_fallback(fake_ort):
    """Training graphs are standard ONNX: OpenVINO trains, and the CPU takes the nodes it cannot run."""
    fake_ort("OpenVINOExecutionProvider", "CPUExecutionProvider")
    resolved = providers.resolve_for_training("openvino:device_type=CPU")
    assert resolved == [("OpenVINOExecutionProvider", {"device_type": "CPU"}), ("CPUExecutionProvider", {})]
    assert providers.describe_providers(resolved) == "openvino (+ cpu)"


def test_auto_picks_the_first_installed_of_the_preference_order(fake_ort):
    fake_ort("CPUExecutionProvider")
    assert providers.resolve_for_training("auto") == [("CPUExecutionProvider", {})]
    fake_ort("CUDAExecutionProvider", "CPUExecutionProvider")
    assert providers.resolve_for_training("auto")[0][0] == "CUDAExecutionProvider"
    assert providers.resolve_for_inference("auto")[0][0] == "CUDAExecutionProvider"


def test_training_refuses_a_provider_registered_inference_only(fake_ort):
    fake_ort("AcmeExecutionProvider", "CPUExecutionProvider")
    providers.register_provider("acme", "AcmeExecutionProvider", can_train=False)
    with pytest.raises(ProviderError) as caught:
        providers.resolve_for_training("acme")
    assert "inference-only" in caught.value.message
    assert "--provider cpu" in caught.value.hint


def test_training_refuses_provider_missing_from_build(fake_ort):
    fake_ort("CPUExecutionProvider")
    with pytest.raises(ProviderError) as caught:
        providers.resolve_for_training("cuda")
    assert "not available in this onnxruntime build" in caught.value.message
    assert "available: cpu" in caught.value.message


def test_training_on_cuda_merges_options_and_keeps_cpu_fallback(fake_ort):
    fake_ort("CUDAExecutionProvider", "CPUExecutionProvider")
    resolved = providers.resolve_for_training("cuda:device_id=1")
    assert resolved == [("CUDAExecutionProvider", {"device_id": "1"}), ("CPUExecutionProvider", {})]
    assert providers.resolve_for_training("cuda", {"device_id": 2})[0] == ("CUDAExecutionProvider", {"device_id": "2"})


def test_ort_provider_names_are_accepted(fake_ort):
    fake_ort("CUDAExecutionProvider", "CPUExecutionProvider")
    assert providers.resolve_for_training("CUDAExecutionProvider")[0][0] == "CUDAExecutionProvider"
    assert providers.resolve_for_training("CPU") == [("CPUExecutionProvider", {})]


def test_inference_uses_available_accelerator_then_cpu(fake_ort):
    fake_ort("OpenVINOExecutionProvider", "CPUExecutionProvider")
    assert providers.resolve_for_inference("openvino:device_type=NPU") == [
        ("OpenVINOExecutionProvider", {"device_type": "NPU"}),
        ("CPUExecutionProvider", {}),
    ]
    assert providers.resolve_for_inference("cpu") == [("CPUExecutionProvider", {})]


def test_inference_falls_back_to_cpu_with_warning(fake_ort, caplog):
    fake_ort("CPUExecutionProvider")
    with caplog.at_level(logging.WARNING, logger="ortft.providers"):
        resolved = providers.resolve_for_inference("vitisai:config_file=/opt/vaip_config.json")
    assert resolved == [("CPUExecutionProvider", {})]
    assert "VitisAIExecutionProvider" in caplog.text and "CPU instead" in caplog.text


def test_inference_still_refuses_unknown_names_and_missing_required_options(fake_ort):
    fake_ort("VitisAIExecutionProvider", "CPUExecutionProvider")
    with pytest.raises(ProviderError, match="unknown execution provider 'fpga'"):
        providers.resolve_for_inference("fpga")
    with pytest.raises(ProviderError, match="config_file") as caught:
        providers.resolve_for_inference("vitisai")
    assert "--provider vitisai:config_file=" in caught.value.hint
    resolved = providers.resolve_for_inference("vitisai", {"config_file": "/opt/vaip_config.json"})
    assert resolved[0] == ("VitisAIExecutionProvider", {"config_file": "/opt/vaip_config.json"})
    assert resolved[-1] == ("CPUExecutionProvider", {})


def test_register_custom_fpga_provider(fake_ort):
    fake_ort("AcmeFpgaExecutionProvider", "CPUExecutionProvider")
    spec = providers.register_provider(
        "acme-fpga",
        "AcmeFpgaExecutionProvider",
        default_options={"bitstream": "/lib/acme/default.bit", "lanes": 4},
        description="Acme FPGA cards",
    )
    assert spec.default_options == {"bitstream": "/lib/acme/default.bit", "lanes": "4"}
    assert "acme-fpga" in providers.available_providers()
    assert providers.resolve_for_inference("acme-fpga:lanes=8") == [
        ("AcmeFpgaExecutionProvider", {"bitstream": "/lib/acme/default.bit", "lanes": "8"}),
        ("CPUExecutionProvider", {}),
    ]
    assert providers.resolve_for_training("acme-fpga")[0][0] == "AcmeFpgaExecutionProvider"


def test_register_provider_guards():
    with pytest.raises(ValueError, match="already registered"):
        providers.register_provider("cpu", "CPUExecutionProvider")
    with pytest.raises(ValueError, match="short name"):
        providers.register_provider("Bad Name", "AcmeExecutionProvider")
    replaced = providers.register_provider(
        "vitisai", "VitisAIExecutionProvider", default_options={"config_file": "/etc/vaip.json"}, replace=True
    )
    assert providers.registered_providers()["vitisai"] is replaced
    providers.reset_registry()
    assert providers.registered_providers()["vitisai"].required_options == ("config_file",)


def test_broken_entry_point_plugin_is_logged_not_fatal(monkeypatch, caplog):
    class BrokenEntryPoint:
        name = "broken"
        value = "vendor_pkg:register"

        def load(self):
            raise ImportError("vendor SDK missing")

    class GoodEntryPoint:
        name = "good"
        value = "vendor_pkg:register_good"

        def load(self):
            return lambda: providers.register_provider("acme", "AcmeExecutionProvider")

    monkeypatch.setattr(
        providers.importlib.metadata, "entry_points", lambda group: [BrokenEntryPoint(), GoodEntryPoint()]
    )
    with caplog.at_level(logging.WARNING, logger="ortft.providers"):
        table = providers.registered_providers()
    assert "acme" in table and "cpu" in table
    assert "vendor SDK missing" in caplog.text


def test_provider_click_option_parses_and_reports_bad_syntax():
    @click.command()
    @providers.provider_option()
    def show(provider):
        click.echo(f"{provider.name} {dict(provider.options)}")

    runner = CliRunner()
    result = runner.invoke(show, ["--provider", "vitisai:config_file=/p/vaip.json"])
    assert result.exit_code == 0
    assert result.output.strip() == "vitisai {'config_file': '/p/vaip.json'}"
    assert runner.invoke(show, []).output.strip() == "cpu {}"
    bad = runner.invoke(show, ["--provider", "cuda:device_id"])
    assert bad.exit_code == 2
    assert "not key=value" in bad.output
