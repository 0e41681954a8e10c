"""ortft/optimizer.py: AdamW in numpy makes torch.optim.AdamW's update, with clip_grad_norm_'s clipping."""

from __future__ import annotations

import numpy as np
import pytest

from ortft.optimizer import AdamW, AdamWSettings, FlatTensors


def _torch_steps(values, grads_per_step, lr, settings):
    import torch

    params = [torch.nn.Parameter(torch.from_numpy(value.copy())) for value in values.values()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(settings.beta1, settings.beta2), eps=settings.eps,
                                  weight_decay=settings.weight_decay)
    for grads in grads_per_step:
        for param, grad in zip(params, grads.values()):
            param.grad = torch.from_numpy(grad.copy())
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
    return {name: param.detach().numpy() for name, param in zip(values, params)}, optimizer


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_steps_equal_torch_adamw(max_grad_norm):
    rng = np.random.default_rng(0)
    shapes = {"a": (4, 8), "b": (8, 3), "magnitude": (5,)}
    values = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    grads_per_step = [{name: (rng.standard_normal(shape) * 10.0 ** rng.integers(-6, 0)).astype(np.float32)
                       for name, shape in shapes.items()} for _ in range(6)]
    settings = AdamWSettings(weight_decay=0.1, max_grad_norm=max_grad_norm, eps=1e-6)
    params = FlatTensors(shapes)
    params.assign(values)
    optimizer = AdamW(params, settings)
    grads = FlatTensors(shapes)
    for step_grads in grads_per_step:
        grads.assign(step_grads)
        optimizer.step(grads.flat, lr=1e-2)
    expected, torch_optimizer = _torch_steps(values, grads_per_step, 1e-2, settings)
    for name in shapes:
        assert not np.allclose(params[name], values[name]), f"{name} did not move"
        np.testing.assert_allclose(params[name], expected[name], rtol=2e-6, atol=1e-7, err_msg=name)
    state = optimizer.state_dict()
    for index, name in enumerate(shapes):
        torch_state = torch_optimizer.state[torch_optimizer.param_groups[0]["params"][index]]
        np.testing.assert_allclose(state[f"exp_avg/{name}"], torch_state["exp_avg"].numpy(), rtol=1e-5, atol=1e-12)
        np.testing.assert_allclose(state[f"exp_avg_sq/{name}"], torch_state["exp_avg_sq"].numpy(), rtol=1e-5, atol=1e-18)


def test_clipping_scales_to_the_global_norm_only_above_it():
    params = FlatTensors({"w": (3,)})
    optimizer = AdamW(params, AdamWSettings(max_grad_norm=1.0))
    small = np.array([0.3, 0.4, 0.0], dtype=np.float32)  # norm 0.5: untouched
    assert optimizer.clip(small) == pytest.approx(0.5)
    np.testing.assert_array_equal(small, np.array([0.3, 0.4, 0.0], dtype=np.float32))
    large = np.array([3.0, 4.0, 0.0], dtype=np.float32)  # norm 5: scaled to ~1
    assert optimizer.clip(large) == pytest.approx(5.0)
    assert float(np.linalg.norm(large)) == pytest.approx(1.0, rel=1e-5)


def test_state_round_trip_resumes_bit_identically():
    """Saving the moments and step count and loading them into a fresh optimizer continues exactly."""
    rng = np.random.default_rng(1)
    shapes = {"a": (6,), "b": (2, 2)}
    start = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
    grads = [rng.standard_normal(10).astype(np.float32) for _ in range(4)]

    def run(split: bool):
        params = FlatTensors(shapes)
        params.assign(start)
        optimizer = AdamW(params, AdamWSettings())
        for index, grad in enumerate(grads):
            if split and index == 2:
                state, step, saved = optimizer.state_dict(), optimizer.step_count, params.to_dict()
                params = FlatTensors(shapes)
                params.assign(saved)
                optimizer = AdamW(params, AdamWSettings())
                optimizer.load_state_dict(state, step)
            optimizer.step(grad.copy(), lr=1e-3)
        return params.flat.copy()

    np.testing.assert_array_equal(run(split=False), run(split=True))


def test_settings_from_the_manifest():
    settings = AdamWSettings.from_manifest({"weight_decay": 0.05, "max_grad_norm": None, "betas": [0.8, 0.99], "eps": 1e-8})
    assert settings == AdamWSettings(weight_decay=0.05, max_grad_norm=None, beta1=0.8, beta2=0.99, eps=1e-8)
