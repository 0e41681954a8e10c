"""Registry of ONNX Runtime execution providers (CPU, CUDA, FPGA/NPU/GPU accelerators) and their hooks.

Turns a user's `--provider NAME[:key=value,...]` into ORT's providers list. Training graphs are standard
ONNX, so every provider may train: ORT places each node on the first provider of the list that can run
it and the rest on the CPU (`ortft train` reports how many nodes each took). `auto` picks the best one
installed (`AUTO_ORDER`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import logging
import re
import sys
from typing import Callable, Iterable, Mapping

import click

from .errors import ProviderError

logger = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
AUTO = "auto"
# `--provider auto`: the first of these that this onnxruntime build has. GPUs first; OpenVINO on its CPU
# device trains SmolLM2 ~9% faster than ORT 1.32's CPU provider (231 against 211 tokens/s on a Zen 4 host)
# but at 12.7 GB peak RSS against 1.7 GB (docs/benchmarks.md): too much for an edge device, so it is not
# in the list (`--provider openvino` asks for it).
AUTO_ORDER = ("cuda", "cpu")
# Python packages may add providers without editing ortft: an entry point in this group names a
# callable that takes no arguments and calls `register_provider(...)`.
ENTRY_POINT_GROUP = "ortft.providers"

_SHORT_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_-]*$")

ProviderList = list[tuple[str, dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class ProviderSpec:
    """One execution provider ortft knows: how users name it and how ORT is told to use it."""

    short_name: str
    ort_name: str
    default_options: Mapping[str, str]
    can_train: bool
    description: str
    required_options: tuple[str, ...] = ()
    option_help: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def options_with(self, overrides: Mapping[str, str] | None) -> dict[str, str]:
        """The default options updated with the user's options (user values win)."""
        merged = {key: str(value) for key, value in self.default_options.items()}
        merged.update({key: str(value) for key, value in (overrides or {}).items()})
        return merged


@dataclasses.dataclass(frozen=True)
class ProviderRequest:
    """What the user asked for: a provider name plus options, e.g. from `--provider vitisai:config_file=x`."""

    name: str
    options: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        if not self.options:
            return self.name
        return self.name + ":" + ",".join(f"{key}={value}" for key, value in self.options.items())


def _qnn_backend_library() -> str:
    return "QnnHtp.dll" if sys.platform == "win32" else "libQnnHtp.so"


def _builtin_specs() -> list[ProviderSpec]:
    """The providers ortft knows out of the box (built on demand, so nothing runs at import time)."""
    return [
        ProviderSpec(
            "cpu", CPU_PROVIDER, {}, True,
            "Any CPU; the default, and the fallback after every accelerator.",
        ),
        ProviderSpec(
            "cuda", CUDA_PROVIDER, {"device_id": "0"}, True,
            "NVIDIA GPUs (the onnxruntime-gpu package).",
            option_help={"device_id": "GPU index", "gpu_mem_limit": "bytes the arena may use"},
        ),
        ProviderSpec(
            "openvino", "OpenVINOExecutionProvider", {}, True,
            "Intel (and other x86) CPUs, integrated GPUs and NPUs via OpenVINO (onnxruntime-openvino).",
            option_help={"device_type": "CPU, GPU or NPU", "precision": "FP32, FP16 or ACCURACY"},
        ),
        ProviderSpec(
            "directml", "DmlExecutionProvider", {"device_id": "0"}, True,
            "Any DirectX 12 GPU on Windows (onnxruntime-directml).",
            option_help={"device_id": "adapter index"},
        ),
        ProviderSpec(
            "qnn", "QNNExecutionProvider", {"backend_path": _qnn_backend_library()}, True,
            "Qualcomm Hexagon NPUs via the QNN SDK (onnxruntime-qnn; quantized models work best).",
            option_help={"backend_path": "QNN backend library (QnnHtp for the NPU, QnnCpu for CPU)"},
        ),
        ProviderSpec(
            "vitisai", "VitisAIExecutionProvider", {}, True,
            "AMD/Xilinx FPGAs and Ryzen AI NPUs via Vitis AI.",
            required_options=("config_file",),
            option_help={
                "config_file": "path to the Vitis AI configuration (vaip_config.json)",
                "cacheDir": "folder for compiled models",
                "cacheKey": "name of this model's cache entry",
            },
        ),
        ProviderSpec(
            "tensorrt", "TensorrtExecutionProvider", {"device_id": "0"}, True,
            "NVIDIA GPUs via TensorRT.",
            option_help={"device_id": "GPU index", "trt_fp16_enable": "True to build FP16 engines"},
        ),
        ProviderSpec(
            "coreml", "CoreMLExecutionProvider", {}, True,
            "Apple Neural Engine and GPUs via Core ML.",
        ),
        ProviderSpec(
            "rocm", "ROCMExecutionProvider", {"device_id": "0"}, True,
            "AMD GPUs via ROCm.",
            option_help={"device_id": "GPU index"},
        ),
    ]


class _Registry:
    """Short name -> ProviderSpec, built on first use: built-ins, then entry-point plugins.

    register_provider() adds to the same table afterwards.
    """

    def __init__(self) -> None:
        self.specs: dict[str, ProviderSpec] | None = None

    def table(self) -> dict[str, ProviderSpec]:
        if self.specs is None:
            self.specs = {spec.short_name: spec for spec in _builtin_specs()}
            _load_entry_point_hooks()
        return self.specs


_registry = _Registry()


def _load_entry_point_hooks() -> None:
    """Run every `ortft.providers` entry point once; a broken plugin is logged, not fatal."""
    try:
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken metadata install must not stop training on CPU
        logger.warning("could not list %s entry points: %s", ENTRY_POINT_GROUP, exc)
        return
    for entry_point in entry_points:
        try:
            hook: Callable[[], object] = entry_point.load()
            hook()
        except Exception as exc:
            logger.warning("provider plugin %s (%s) failed: %s", entry_point.name, entry_point.value, exc)


def register_provider(
    short_name: str,
    ort_name: str,
    *,
    default_options: Mapping[str, str] | None = None,
    can_train: bool = True,
    description: str = "",
    required_options: Iterable[str] = (),
    option_help: Mapping[str, str] | None = None,
    replace: bool = False,
) -> ProviderSpec:
    """Add (or with `replace`, override) a provider so `--provider SHORT_NAME` works everywhere.

    `ort_name` is the name ORT reports in `onnxruntime.get_available_providers()`. `can_train` False
    keeps a provider to inference (e.g. one whose kernels are known to be wrong for training graphs).
    Raises ValueError for a malformed name or a duplicate without `replace`.
    """
    if not _SHORT_NAME_PATTERN.match(short_name):
        raise ValueError(f"provider short name {short_name!r} must be lowercase letters, digits, '-' or '_'")
    if not ort_name:
        raise ValueError("ort_name must be the provider name ORT reports, e.g. 'VitisAIExecutionProvider'")
    spec = ProviderSpec(
        short_name=short_name,
        ort_name=ort_name,
        default_options={key: str(value) for key, value in (default_options or {}).items()},
        can_train=can_train,
        description=description,
        required_options=tuple(required_options),
        option_help=dict(option_help or {}),
    )
    table = _registry.table()
    if short_name in table and not replace:
        raise ValueError(f"provider {short_name!r} is already registered; pass replace=True to override it")
    table[short_name] = spec
    return spec


def unregister_provider(short_name: str) -> None:
    """Remove a provider added with register_provider (built-ins come back on reset_registry())."""
    _registry.table().pop(short_name, None)


def reset_registry() -> None:
    """Forget custom providers; the next lookup rebuilds built-ins and reruns entry-point hooks."""
    _registry.specs = None


def registered_providers() -> dict[str, ProviderSpec]:
    """A copy of the registry: short name -> ProviderSpec."""
    return dict(_registry.table())


def _ort_provider_names() -> list[str]:
    """The provider names this onnxruntime build reports (a seam for tests)."""
    from .runtime import onnxruntime_module

    return list(onnxruntime_module().get_available_providers())


def available_providers() -> list[str]:
    """Short names of the providers this ORT build reports, in ORT's order of preference.

    A provider ORT reports that ortft has no entry for is listed under its ORT name.
    """
    by_ort_name = {spec.ort_name: spec.short_name for spec in _registry.table().values()}
    return [by_ort_name.get(ort_name, ort_name) for ort_name in _ort_provider_names()]


def parse_provider_request(text: str) -> ProviderRequest:
    """Parse `NAME[:key=value[,key=value...]]`, e.g. `vitisai:config_file=/opt/vaip.json,cacheDir=/tmp/c`.

    The name is split off at the first ':' so option values may hold ':' (Windows paths, URLs).
    """
    text = text.strip()
    name, _, option_text = text.partition(":")
    name = name.strip()
    if not name:
        raise ProviderError(
            f"empty provider name in {text!r}",
            hint="write --provider NAME or --provider NAME:key=value,key=value (e.g. cpu, cuda:device_id=1)",
        )
    options: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in option_text.split(","))):
        key, equals, value = item.partition("=")
        key = key.strip()
        if not equals or not key:
            raise ProviderError(
                f"provider option {item!r} in {text!r} is not key=value",
                hint=f"write --provider {name}:key=value,key=value",
            )
        options[key] = value.strip()
    return ProviderRequest(name=name, options=options)


def _as_request(name: str | ProviderRequest, options: Mapping[str, str] | None) -> ProviderRequest:
    request = name if isinstance(name, ProviderRequest) else parse_provider_request(name)
    if options:
        request = ProviderRequest(request.name, {**request.options, **{k: str(v) for k, v in options.items()}})
    return request


def _available_text() -> str:
    available = available_providers()
    return ", ".join(available) if available else "none"


def _known_text() -> str:
    return ", ".join(sorted(_registry.table()))


def lookup(name: str) -> ProviderSpec:
    """The spec for a short name (case-insensitive) or an ORT provider name; ProviderError if unknown.

    A provider ORT reports but ortft has no entry for is accepted by its ORT name, with no defaults.
    """
    table = _registry.table()
    spec = table.get(name.lower())
    if spec is not None:
        return spec
    for candidate in table.values():
        if candidate.ort_name.lower() == name.lower():
            return candidate
    if name in _ort_provider_names():
        return ProviderSpec(name, name, {}, True, "reported by onnxruntime")
    raise ProviderError(
        f"unknown execution provider {name!r}; known: {_known_text()}; available in this onnxruntime "
        f"build: {_available_text()}",
        hint="pick one of the available providers, or register a vendor provider (see docs/providers.md)",
    )


def _check_required_options(spec: ProviderSpec, options: Mapping[str, str]) -> None:
    missing = [key for key in spec.required_options if not options.get(key)]
    if missing:
        example = ",".join(f"{key}=..." for key in missing)
        raise ProviderError(
            f"provider {spec.short_name!r} needs option(s) {', '.join(missing)}",
            hint=f"pass --provider {spec.short_name}:{example}",
        )


def _is_available(spec: ProviderSpec) -> bool:
    return spec.ort_name in _ort_provider_names()


def auto_provider() -> str:
    """The short name `--provider auto` stands for here: the first of AUTO_ORDER this build has."""
    for short_name in AUTO_ORDER:
        if _is_available(_registry.table()[short_name]):
            return short_name
    return "cpu"


def resolve_for_training(name: str | ProviderRequest, options: Mapping[str, str] | None = None) -> ProviderList:
    """The (ORT provider name, options) list a training session uses; ProviderError if it cannot train here.

    Refuses a provider that is unknown, marked inference-only, lacks a required option, or is not in this
    onnxruntime build; the message lists what is available. An accelerator's list ends with CPU, which
    runs the nodes it cannot. `auto` is `auto_provider()`.
    """
    request = _as_request(name, options)
    if request.name.lower() == AUTO:
        request = ProviderRequest(auto_provider(), request.options)
    spec = lookup(request.name)
    if not spec.can_train:
        raise ProviderError(
            f"execution provider {spec.short_name!r} ({spec.ort_name}) is registered as inference-only",
            hint=f"train with --provider cpu, then use --provider {spec.short_name} for eval/export/generate",
        )
    merged = spec.options_with(request.options)
    _check_required_options(spec, merged)
    if not _is_available(spec):
        raise ProviderError(
            f"execution provider {spec.short_name!r} ({spec.ort_name}) is not available in this onnxruntime "
            f"build; available: {_available_text()}",
            hint="use --provider cpu, or install the onnxruntime package that brings it (docs/providers.md)",
        )
    providers: ProviderList = [(spec.ort_name, merged)]
    if spec.ort_name != CPU_PROVIDER:
        providers.append((CPU_PROVIDER, {}))
    return providers


def describe_providers(providers: ProviderList) -> str:
    """`cpu`, or e.g. `openvino (+ cpu)`: the short names of a providers list, for logs and run files."""
    by_ort_name = {spec.ort_name: spec.short_name for spec in _registry.table().values()}
    names = [by_ort_name.get(ort_name, ort_name) for ort_name, _options in providers]
    return names[0] + (f" (+ {', '.join(names[1:])})" if len(names) > 1 else "")


def resolve_for_inference(name: str | ProviderRequest, options: Mapping[str, str] | None = None) -> ProviderList:
    """The providers list for `onnxruntime.InferenceSession(..., providers=...)`, best first.

    An accelerator is always followed by CPU, which runs the ops it does not support. A provider
    missing from this onnxruntime build falls back to CPU with a logged warning. An unknown name or
    a missing required option is a ProviderError (a typo should not silently run on CPU).
    """
    request = _as_request(name, options)
    if request.name.lower() == AUTO:
        request = ProviderRequest(auto_provider(), request.options)
    spec = lookup(request.name)
    merged = spec.options_with(request.options)
    _check_required_options(spec, merged)
    if spec.ort_name == CPU_PROVIDER:
        return [(CPU_PROVIDER, merged)]
    if not _is_available(spec):
        logger.warning(
            "execution provider %s (%s) is not available in this onnxruntime build (available: %s); "
            "running on CPU instead",
            spec.short_name, spec.ort_name, _available_text(),
        )
        return [(CPU_PROVIDER, {})]
    return [(spec.ort_name, merged), (CPU_PROVIDER, {})]


class ProviderParamType(click.ParamType):
    """Click type for `--provider NAME[:key=value,...]`; converts to a ProviderRequest.

    Only the syntax is checked here; commands call resolve_for_training/resolve_for_inference, which
    know whether the provider fits the job.
    """

    name = "provider"

    def convert(self, value, param, ctx) -> ProviderRequest:
        if isinstance(value, ProviderRequest):
            return value
        try:
            return parse_provider_request(str(value))
        except ProviderError as exc:
            self.fail(exc.message, param, ctx)


def provider_option(default: str = "cpu", help_text: str | None = None) -> Callable:
    """A ready-made click `--provider` option for commands (value: a ProviderRequest)."""
    return click.option(
        "--provider",
        "provider",
        type=ProviderParamType(),
        default=default,
        show_default=True,
        help=help_text
        or "Execution provider, NAME[:key=value,...], e.g. cpu, cuda:device_id=1, "
        "vitisai:config_file=/path/vaip_config.json (see docs/providers.md).",
    )
