"""ortft: fine-tune language models on edge devices with ONNX Runtime's on-device training.

`ortft prepare` (host) builds a training bundle; `ortft train/eval/export/generate` (device) use it.
"""

__version__ = "0.1.0"
