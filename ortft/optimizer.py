"""ortft's optimizer step on the device: AdamW with PyTorch's update and global-norm clipping, in numpy.

With stock onnxruntime the training graph only computes the loss and the adapters' gradients; the
update is this module's. All trainable tensors live as views of one flat float32 buffer (and so do
their gradients and moments), so a step is a handful of vectorised operations however many adapters
there are (SmolLM2-135M, r16 on every linear layer: 4.9 M parameters, ~10 ms a step on 2 cores).

The maths, per step t (1-based) with learning rate lr, as `torch.optim.AdamW` computes it:
    clipping (if max_grad_norm): n = ||g||_2 over every tensor; g <- g * min(1, max_grad_norm / (n + 1e-6))
    p <- p * (1 - lr * weight_decay)
    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
The clipping coefficient and its epsilon are those of `torch.nn.utils.clip_grad_norm_` (and of ORT's
ClipGradNorm, which the training API used).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ADAMW_UPDATE = "torch.optim.AdamW"  # the update this module makes (manifest optimizer.update)
CLIP_EPSILON = 1e-6


@dataclass(frozen=True)
class AdamWSettings:
    """The optimizer section of a bundle's manifest."""

    weight_decay: float = 0.01
    max_grad_norm: float | None = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-6

    @classmethod
    def from_manifest(cls, section: dict) -> "AdamWSettings":
        betas = section.get("betas") or (0.9, 0.999)
        max_norm = section.get("max_grad_norm")
        return cls(weight_decay=float(section.get("weight_decay", 0.0) or 0.0),
                   max_grad_norm=float(max_norm) if max_norm else None,
                   beta1=float(betas[0]), beta2=float(betas[1]), eps=float(section.get("eps", 1e-6)))


class FlatTensors:
    """Named float32 tensors stored as reshaped views of one contiguous 1-D buffer."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}
        sizes = [int(np.prod(shape)) if shape else 1 for shape in self.shapes.values()]
        self.flat = np.zeros(sum(sizes), dtype=np.float32)
        self.views: dict[str, np.ndarray] = {}
        offset = 0
        for (name, shape), size in zip(self.shapes.items(), sizes):
            self.views[name] = self.flat[offset:offset + size].reshape(shape)
            offset += size

    def __getitem__(self, name: str) -> np.ndarray:
        return self.views[name]

    def names(self) -> list[str]:
        return list(self.views)

    def assign(self, values: dict[str, np.ndarray]) -> None:
        """Copy `values` into the views (every name, the same shapes)."""
        for name, view in self.views.items():
            view[...] = values[name]

    def to_dict(self, copy: bool = True) -> dict[str, np.ndarray]:
        return {name: (view.copy() if copy else view) for name, view in self.views.items()}


class AdamW:
    """AdamW over a FlatTensors of parameters; gradients come as a flat array of the same layout."""

    def __init__(self, params: FlatTensors, settings: AdamWSettings):
        self.params = params
        self.settings = settings
        self.exp_avg = np.zeros_like(params.flat)
        self.exp_avg_sq = np.zeros_like(params.flat)
        self.step_count = 0
        self._scratch = np.empty_like(params.flat)

    def clip(self, grad: np.ndarray) -> float:
        """Scale `grad` in place to the global norm bound; returns the norm before clipping."""
        norm = float(np.sqrt(np.dot(grad, grad)))  # float32 BLAS dot, as torch's float32 norm (float64: 50x slower)
        limit = self.settings.max_grad_norm
        if limit:
            coefficient = limit / (norm + CLIP_EPSILON)
            if coefficient < 1.0:
                grad *= np.float32(coefficient)
        return norm

    def step(self, grad: np.ndarray, lr: float) -> float:
        """One update with the flat gradient `grad` (modified: clipped in place). Returns the gradient norm."""
        s = self.settings
        norm = self.clip(grad)
        self.step_count += 1
        t = self.step_count
        p, m, v, tmp = self.params.flat, self.exp_avg, self.exp_avg_sq, self._scratch
        if s.weight_decay:
            p *= np.float32(1.0 - lr * s.weight_decay)
        m *= np.float32(s.beta1)
        np.multiply(grad, np.float32(1.0 - s.beta1), out=tmp)
        m += tmp
        v *= np.float32(s.beta2)
        np.multiply(grad, grad, out=tmp)
        tmp *= np.float32(1.0 - s.beta2)
        v += tmp
        bias1 = 1.0 - s.beta1 ** t
        bias2_sqrt = np.sqrt(1.0 - s.beta2 ** t)
        np.sqrt(v, out=tmp)
        tmp /= np.float32(bias2_sqrt)
        tmp += np.float32(s.eps)
        np.divide(m, tmp, out=tmp)
        tmp *= np.float32(lr / bias1)
        p -= tmp
        return norm

    def state_dict(self) -> dict[str, np.ndarray]:
        """The moments by parameter name (`exp_avg/NAME`, `exp_avg_sq/NAME`), as PyTorch names them."""
        state = {}
        for name, view in self.params.views.items():
            start = _offset_of(self.params.flat, view)
            size = view.size
            state[f"exp_avg/{name}"] = self.exp_avg[start:start + size].reshape(view.shape).copy()
            state[f"exp_avg_sq/{name}"] = self.exp_avg_sq[start:start + size].reshape(view.shape).copy()
        return state

    def load_state_dict(self, state: dict[str, np.ndarray], step: int) -> None:
        for name, view in self.params.views.items():
            start = _offset_of(self.params.flat, view)
            size = view.size
            self.exp_avg[start:start + size] = np.asarray(state[f"exp_avg/{name}"], dtype=np.float32).reshape(-1)
            self.exp_avg_sq[start:start + size] = np.asarray(state[f"exp_avg_sq/{name}"], dtype=np.float32).reshape(-1)
        self.step_count = int(step)


def _offset_of(flat: np.ndarray, view: np.ndarray) -> int:
    return (view.__array_interface__["data"][0] - flat.__array_interface__["data"][0]) // flat.itemsize
