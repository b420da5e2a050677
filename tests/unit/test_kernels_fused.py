"""Fused Triton kernels (RMSNorm, RoPE, SwiGLU) against their pure-torch references, forward and backward,
on CPU through Triton's interpreter; and a model with `apply_fused_kernels` against the plain model.

TRITON_INTERPRET must be set when triton (and the kernels) are imported, since triton.jit decides at
decoration time, and while they run. When this file is imported in a process where triton was already
imported without it (in the full suite, `torch.utils.flop_counter` imports triton), the checks run in a
fresh interpreter process instead (`test_kernels_in_a_fresh_process`), which runs this file again.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:  # checked without importing it (see the docstring)
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)
_FRESH = "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1"

if _FRESH:
    _old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
from longtrain.parallel.fused_kernels import apply_fused_kernels  # noqa: E402
from longtrain.kernels import rmsnorm as rmsnorm_mod  # noqa: E402
from longtrain.kernels.cross_entropy_grad import ce_loss_and_grad_inplace, ce_loss_and_grad_reference  # noqa: E402
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference  # noqa: E402
from longtrain.kernels.rmsnorm import rmsnorm, rmsnorm_reference  # noqa: E402
from longtrain.kernels.rope_apply import rope_apply, rope_apply_reference  # noqa: E402
from longtrain.kernels.swiglu import swiglu, swiglu_reference  # noqa: E402

if _FRESH:
    if _old is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _old

from longtrain.model.args import model_flavor  # noqa: E402
from longtrain.model.decoder import Transformer  # noqa: E402
from longtrain.model.rope import RotaryEmbedding  # noqa: E402

_INTERPRETED = _FRESH and rmsnorm_mod.INTERPRET
interpreted = pytest.mark.skipif(not _INTERPRETED, reason="run by test_kernels_in_a_fresh_process (triton "
                                 "was imported before TRITON_INTERPRET=1 in this process)")


@pytest.mark.skipif(_INTERPRETED, reason="the checks run in this process")
def test_kernels_in_a_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # All eight checks ran (only this test, which is pointless there, is skipped in the fresh process).
    assert "8 passed, 1 skipped" in proc.stdout, proc.stdout[-2000:]


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


# fp32 everywhere; the kernels reorder the fp32 sums: rounding only.
FP32 = dict(atol=2e-5, rtol=2e-5)


def _grads(fn, inputs, dy):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point() and t.requires_grad) for t in inputs]
    y = fn(*inputs)
    return y, torch.autograd.grad(y, [t for t in inputs if t.requires_grad], dy)


@interpreted
def test_rmsnorm():
    x = torch.randn(3, 5, 48, requires_grad=True)  # dim not a power of two: masked tail
    w = (1 + 0.1 * torch.randn(48)).requires_grad_()
    dy = torch.randn(3, 5, 48)
    y, g = _grads(lambda a, b: rmsnorm(a, b, 1e-5), [x, w], dy)
    y_ref, g_ref = _grads(lambda a, b: rmsnorm_reference(a, b, 1e-5), [x, w], dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **FP32)


@interpreted
def test_swiglu():
    gate, up = torch.randn(4, 7, 40, requires_grad=True), torch.randn(4, 7, 40, requires_grad=True)
    dy = torch.randn(4, 7, 40)
    y, g = _grads(swiglu, [gate, up], dy)
    y_ref, g_ref = _grads(swiglu_reference, [gate, up], dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **FP32)
    with pytest.raises(ValueError, match="must match"):
        swiglu(gate, up[..., :8])


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_grad_kernel(dtype):
    g = torch.Generator().manual_seed(0)
    vocab = 9000  # over one 8192-wide block, not a power of two: two passes with a masked tail
    logits = (torch.randn(6, vocab, generator=g) * 4).to(dtype)
    labels = torch.randint(0, vocab, (6,), generator=g)
    labels[1] = -100  # an ignored row: zero loss, zero gradient
    labels[4] = vocab - 1  # the last column, inside the masked tail block
    ref_loss, ref_grad = ce_loss_and_grad_reference(logits, labels)
    buf = logits.clone()
    loss = ce_loss_and_grad_inplace(buf, labels)
    torch.testing.assert_close(loss, ref_loss, **FP32)
    # bf16: the gradient is rounded once to bf16 on both sides (at most one ulp apart: 2**-8 near 1)
    tol = FP32 if dtype == torch.float32 else dict(atol=2**-8, rtol=2**-7)
    torch.testing.assert_close(buf, ref_grad, **tol)
    assert loss[1] == 0 and not buf[1].any()
    untouched = logits.clone()
    torch.testing.assert_close(ce_loss_and_grad_inplace(untouched, labels, write_grad=False), ref_loss, **FP32)
    assert torch.equal(untouched, logits)  # loss only: the logits stay
    with pytest.raises(ValueError, match="labels must be"):
        ce_loss_and_grad_inplace(logits.clone(), labels[:3])


@interpreted
def test_linear_cross_entropy_triton_impl_matches_reference():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 19, 24, generator=g, requires_grad=True)
    w = torch.randn(300, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (2, 19), generator=g)
    y[0, :5] = -100
    loss = linear_cross_entropy(h, w, y, chunk_tokens=7, impl="triton")  # ragged last chunk
    gh, gw = torch.autograd.grad(loss * 0.37, (h, w))
    ref = linear_cross_entropy_reference(h.reshape(-1, 24), w, y.reshape(-1))
    rh, rw = torch.autograd.grad(ref * 0.37, (h, w))
    torch.testing.assert_close(loss, ref, **FP32)
    torch.testing.assert_close(gh, rh, **FP32)
    torch.testing.assert_close(gw, rw, **FP32)


@interpreted
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_rope(partial):
    bs, s, h, d = 2, 9, 3, 16
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
    pos = torch.randint(0, 100_000, (bs, s))  # large positions: fp32 angles matter
    cos, sin = RotaryEmbedding(rope, d, 4096)(pos)
    x = torch.randn(bs, s, h, d, requires_grad=True)
    dy = torch.randn(bs, s, h, d)
    y, (gx,) = _grads(lambda a: rope_apply(a, cos, sin), [x], dy)
    y_ref, (gx_ref,) = _grads(lambda a: rope_apply_reference(a, cos, sin), [x], dy)
    torch.testing.assert_close(y, y_ref, **FP32)
    torch.testing.assert_close(gx, gx_ref, **FP32)
    with pytest.raises(ValueError, match="float32"):
        rope_apply(x, cos.bfloat16(), sin.bfloat16())


@interpreted
def test_model_with_fused_kernels_matches_plain_model():
    args = model_flavor("debug")
    plain = Transformer(args)
    plain.init_weights(0)
    fused = Transformer(args)
    fused.load_state_dict(plain.state_dict())
    apply_fused_kernels(fused)
    ids = torch.randint(0, args.vocab_size, (2, 24))
    out_plain, out_fused = plain(ids), fused(ids)
    torch.testing.assert_close(out_fused, out_plain, atol=1e-4, rtol=1e-4)  # fp32, 2 layers of reordering
    out_plain.square().mean().backward()
    out_fused.square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-3, msg=name)
