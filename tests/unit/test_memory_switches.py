"""Every memory switch gives the plain path's loss and gradients (fp32, CPU, tiny model)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from longtrain.kernels.attention import AttnMask
from longtrain.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from longtrain.kernels.tiled_mlp import apply_tiled_mlp
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.parallel.activation_checkpoint import apply_ac
from longtrain.parallel.offload import HostBudgetError, host_memory_available

# fp32 on CPU: switches only reorder sums (chunks, tiles, recompute), so results agree to fp32 rounding
# accumulated over a few hundred terms.
RTOL, ATOL = 1e-5, 1e-6


def sdpa_cpu_attention(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask, scale: float) -> tuple[Tensor, Tensor]:
    """Causal attention through the fused aten CPU flash kernel (one op, so selective AC can keep it)."""
    assert mask.contiguous and not mask.has_docs
    rep = q.shape[2] // k.shape[2]
    qt = q.transpose(1, 2)  # (bs, n_heads, s, head_dim)
    kt = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vt = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qt, kt, vt, 0.0, True, scale=scale)[:2]
    return out.transpose(1, 2), lse.float()


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    model = Transformer(model_flavor("debug", **overrides))
    model.init_weights(seed)
    return model


def loss_and_grads(model: Transformer, ids: Tensor, labels: Tensor, loss_fn=None) -> tuple[Tensor, dict]:
    model.zero_grad(set_to_none=True)
    h = model.hidden_states(ids)
    fn = loss_fn or (lambda h, w, y: linear_cross_entropy_reference(h.reshape(-1, h.shape[-1]), w, y.reshape(-1)))
    loss = fn(h, model.output_weight, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a: tuple[Tensor, dict], b: tuple[Tensor, dict]) -> None:
    torch.testing.assert_close(a[0], b[0], rtol=RTOL, atol=ATOL)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=RTOL, atol=ATOL, msg=name)


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 48), generator=g)
    labels = torch.randint(0, 512, (2, 48), generator=g)
    labels[:, ::5] = -100
    return ids, labels


# ---- linear + cross-entropy -------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 7, 16, 1000])
def test_chunked_ce_matches_reference(chunk: int) -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 33, 24, generator=g, requires_grad=True)
    w = torch.randn(101, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 101, (3, 33), generator=g)
    y[0, :10] = -100
    loss = linear_cross_entropy(h, w, y, chunk_tokens=chunk)
    gh, gw = torch.autograd.grad(loss * 0.37, (h, w))  # a non-unit grad_output must scale the stored grads
    ref = linear_cross_entropy_reference(h.reshape(-1, 24), w, y.reshape(-1))
    rh, rw = torch.autograd.grad(ref * 0.37, (h, w))
    torch.testing.assert_close(loss, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gh, rh, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(gw, rw, rtol=RTOL, atol=ATOL)
    assert loss.dtype == torch.float32


def test_chunked_ce_bf16_close_to_fp32_reference() -> None:
    # bf16 logits chunk, fp32 log-sum-exp: the error is bf16 rounding of the inputs/logits (~3 significant digits).
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(200, 32, generator=g) * 0.2
    y = torch.randint(0, 200, (64,), generator=g)
    loss = linear_cross_entropy(h.bfloat16(), w.bfloat16(), y, chunk_tokens=16)
    ref = linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fp32-accumulating GEMM path runs on CUDA")
@pytest.mark.parametrize("impl", ["torch", "compile", "triton"])
def test_chunked_ce_cuda_bf16_gradients_close_to_fp32_reference(impl: str) -> None:
    # On CUDA the weight gradient is accumulated over chunks by addmm into fp32 (bf16 inputs): it must agree
    # with the fp32 reference to bf16 input rounding (relative L2, METHOD.md's bf16 range).
    g = torch.Generator().manual_seed(0)
    n, d, v = 3000, 256, 5000  # several chunks of 1024 and a ragged last one
    h, w = torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.05
    y = torch.randint(0, v, (n,), generator=g)
    y[::7] = -100
    hb = h.cuda().bfloat16().requires_grad_()
    wb = w.cuda().bfloat16().requires_grad_()
    loss = linear_cross_entropy(hb, wb, y.cuda(), chunk_tokens=1024, impl=impl)
    (loss * 0.5).backward()
    hr, wr = h.cuda().requires_grad_(), w.cuda().requires_grad_()
    ref = linear_cross_entropy_reference(hr, wr, y.cuda())
    (ref * 0.5).backward()
    rel = lambda a, b: float((a.float() - b).norm() / b.norm())  # noqa: E731
    assert rel(loss, ref) < 1e-2
    assert rel(hb.grad, hr.grad) < 2e-2 and rel(wb.grad, wr.grad) < 2e-2, (rel(hb.grad, hr.grad), rel(wb.grad, wr.grad))


def test_chunked_ce_zero_valid_labels_gives_zero_and_zero_grads() -> None:
    h = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(30, 8, requires_grad=True)
    y = torch.full((2, 9), -100)
    loss = linear_cross_entropy(h, w, y, chunk_tokens=4)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


def test_chunked_ce_bad_input() -> None:
    h, w = torch.randn(4, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="outside"):
        linear_cross_entropy(h, w, torch.tensor([1, 2, 10, -100]))
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(h, w, torch.tensor([1, 2, 3, 4]), impl="cuda-magic")
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(h, w, torch.tensor([1, 2, 3]))


def test_model_with_chunked_ce(data) -> None:
    ids, labels = data
    model = tiny_model()
    plain = loss_and_grads(model, ids, labels)
    chunked = loss_and_grads(model, ids, labels, lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=13))
    assert_same(plain, chunked)


# ---- tiled MLP ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("tile", [5, 16])
def test_tiled_mlp_matches_plain(data, tile: int) -> None:
    ids, labels = data
    model = tiny_model()
    plain = loss_and_grads(model, ids, labels)
    assert apply_tiled_mlp(model, tile) == tile
    assert_same(plain, loss_and_grads(model, ids, labels))
    with pytest.raises(ValueError, match="tile_tokens"):
        apply_tiled_mlp(model, 0)


def test_tiled_mlp_keeps_only_tile_inputs() -> None:
    # The tiled MLP must not save (seq x intermediate) tensors for backward: count what autograd saves.
    model = tiny_model()
    apply_tiled_mlp(model, 8)
    mlp, x = model.layers[0].mlp, torch.randn(1, 64, 64, requires_grad=True)
    saved: list[tuple] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        mlp(x).sum().backward()
    inter = model.args.intermediate_size
    assert not any(inter in s and 64 in s for s in saved), saved  # no (…, 64 tokens, intermediate) tensor
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ---- activation checkpointing + offload --------------------------------------------------------------

@pytest.mark.parametrize("mode,offload", [("full", False), ("selective", False), ("full", True), ("none", True)])
def test_ac_matches_plain(data, mode: str, offload: bool) -> None:
    ids, labels = data
    model = tiny_model()
    plain = loss_and_grads(model, ids, labels)
    offloader = apply_ac(model, mode, offload=offload, offload_min_bytes=0)
    assert_same(plain, loss_and_grads(model, ids, labels))
    if offload:
        assert offloader.peak_bytes > 0  # the hooks really moved tensors
        assert offloader.live_bytes == 0  # and released them once backward consumed them


def test_gpu_checkpoint_layers_split_the_offload(data) -> None:
    """memory.gpu_checkpoint_layers: the last k blocks keep their checkpoint on the device; the host holds the
    others' (one block input each), and the gradients are those of the plain model."""
    ids, labels = data
    peaks = {}
    for keep in (0, 1, 2):
        model = tiny_model(n_layers=2)
        plain = loss_and_grads(model, ids, labels)
        offloader = apply_ac(model, "full", offload=True, offload_min_bytes=0, gpu_layers=keep)
        assert_same(plain, loss_and_grads(model, ids, labels))
        peaks[keep] = offloader.peak_bytes
    block_input = ids.numel() * tiny_model().args.dim * 4  # fp32 (bs, seq, dim)
    assert peaks[0] - peaks[1] == block_input and peaks[2] == 0
    with pytest.raises(ValueError, match="needs mode 'full' with offload"):
        apply_ac(tiny_model(), "full", offload=False, gpu_layers=1)


@pytest.mark.parametrize("offload,gpu_layers", [(False, 0), (True, 0), (True, 1)])
def test_checkpoint_stride_keeps_one_input_per_group(data, offload: bool, gpu_layers: int) -> None:
    """stride 2: the second block of each pair re-runs the first from the pair's stored input in backward; the
    gradients are the plain model's and the host holds one block input per pair (dedup of the shared input)."""
    ids, labels = data
    model = tiny_model(n_layers=5)
    plain = loss_and_grads(model, ids, labels)
    offloader = apply_ac(model, "full", offload=offload, offload_min_bytes=0, gpu_layers=gpu_layers, stride=2)
    assert_same(plain, loss_and_grads(model, ids, labels))
    if offload:
        block_input = ids.numel() * model.args.dim * 4  # fp32 (bs, seq, dim)
        pairs = -(-(5 - gpu_layers) // 2)
        cos_sin = offloader.peak_bytes - pairs * block_input
        assert 0 <= cos_sin < block_input, (offloader.peak_bytes, pairs)
    with pytest.raises(ValueError, match="needs mode 'full'"):
        apply_ac(tiny_model(), "selective", stride=2)


@pytest.mark.parametrize("mode,offload", [("none", False), ("full", False), ("full", True), ("selective", False)])
def test_seq_tiled_blocks_match_plain(data, mode: str, offload: bool) -> None:
    # qk-norm and q/k/v biases (Qwen3 / Qwen2 shapes): the tiled block must call every submodule the block does.
    ids, labels = data
    model = tiny_model(qk_norm=True, qkv_bias=True, o_bias=True)
    with torch.no_grad():
        for layer in model.layers:  # non-zero biases so that a skipped bias would show
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj):
                lin.bias.normal_(0.0, 0.1)
    plain = loss_and_grads(model, ids, labels)
    apply_ac(model, mode, offload=offload, offload_min_bytes=0, seq_tile=10)
    assert_same(plain, loss_and_grads(model, ids, labels))


def _saved_shapes(model: Transformer, ids: Tensor) -> list[tuple]:
    saved: list[tuple] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        h = model.hidden_states(ids)
    h.sum().backward()
    return saved


def test_seq_tiled_block_saves_only_attention_tensors() -> None:
    # Outside the per-tile checkpoints autograd may keep attention's q/k/v/out, never a whole-sequence MLP
    # intermediate, and far fewer (seq, dim) norm/residual tensors than the plain block.
    ids = torch.randint(0, 512, (1, 96))
    plain = _saved_shapes(tiny_model(), ids)
    model = tiny_model()
    apply_ac(model, "none", seq_tile=8)
    tiled = _saved_shapes(model, ids)
    inter, dim = model.args.intermediate_size, model.args.dim
    assert any(s[-1] == inter and 96 in s for s in plain)  # the plain block does keep them
    assert not any(s[-1] == inter and 96 in s for s in tiled), tiled
    n_plain, n_tiled = plain.count((1, 96, dim)), tiled.count((1, 96, dim))
    assert n_tiled <= 4 < n_plain, (n_tiled, n_plain)  # only the final norm's tensors remain whole-sequence
    assert any(len(s) == 4 and 96 in s for s in tiled)  # attention's q/k/v are kept, not recomputed


def test_ac_with_tiled_mlp_and_chunked_ce(data) -> None:
    ids, labels = data
    model = tiny_model()
    plain = loss_and_grads(model, ids, labels)
    apply_ac(model, "full", offload=True, offload_min_bytes=0)
    apply_tiled_mlp(model, 16)
    assert_same(plain, loss_and_grads(model, ids, labels, lambda h, w, y: linear_cross_entropy(h, w, y, chunk_tokens=32)))


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self, op):
        super().__init__()
        self.op, self.count = op, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func == self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode,runs_per_layer", [("none", 1), ("full", 2), ("selective", 1)])
def test_selective_ac_does_not_recompute_attention(data, mode: str, runs_per_layer: int) -> None:
    ids, labels = data
    model = tiny_model()
    model.set_attention(sdpa_cpu_attention)
    plain = loss_and_grads(model, ids, labels)
    apply_ac(model, mode)
    counter = _CountOps(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default)
    with counter:
        result = loss_and_grads(model, ids, labels)
    assert_same(plain, result)
    assert counter.count == runs_per_layer * model.args.n_layers


def test_ac_bad_options() -> None:
    model = tiny_model()
    with pytest.raises(ValueError, match="valid: none, selective, full"):
        apply_ac(model, "some")
    with pytest.raises(NotImplementedError, match="selective"):
        apply_ac(model, "selective", offload=True)


def test_host_budget_too_large_fails_at_apply() -> None:
    with pytest.raises(HostBudgetError, match="available"):
        apply_ac(tiny_model(), "full", offload=True, host_budget_bytes=host_memory_available() * 4)


def test_host_budget_exceeded_fails_before_offloading(data) -> None:
    ids, labels = data
    model = tiny_model()
    offloader = apply_ac(model, "full", offload=True, host_budget_bytes=10_000, offload_min_bytes=0)
    needed = model.args.n_layers * ids.numel() * model.args.dim * 4
    with pytest.raises(HostBudgetError, match=r"needs .* GiB of host RAM .*offload_activations=false"):
        model.hidden_states(ids)
    assert offloader.live_bytes == 0 and needed > 10_000  # nothing was moved before the check fired
