"""ortft: fine-tune language models on edge devices with stock ONNX Runtime, no PyTorch on the device.

`ortft prepare` (host) builds a training bundle; `ortft train/eval/export/generate` (device) use it.
"""

__version__ = "0.1.0"
