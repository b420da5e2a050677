"""Attention backends against the fp32 reference on CPU (flex forward, layouts, the LSE-gradient identity).

The fused CUDA backends (sdpa_flash, sdpa_cudnn, flash_attn, fa4) are checked against the same reference
in bf16 on the GPU by benchmarks/attention.py --check; here we check that they refuse CPU loudly.
"""

from __future__ import annotations

import math

import pytest
import torch

from longtrain.kernels.attention import ANCHOR_DOC, ATTENTION_BACKENDS, AttnMask, attention_reference, get_attention_backend
from longtrain.kernels.attention_auto import choose_backend
from longtrain.kernels.attention_layout import classify
from longtrain.kernels.attention_sdpa import _out_for_backward

# fp32 on both sides; flex eager computes the same softmax in another order: rounding only.
FP32_ATOL = 2e-5


def _qkv(bs: int, sq: int, sk: int, h: int = 4, h_kv: int = 2, d: int = 16):
    return torch.randn(bs, sq, h, d), torch.randn(bs, sk, h_kv, d), torch.randn(bs, sk, h_kv, d)


def _check_flex(q, k, v, mask):
    scale = 1.0 / math.sqrt(q.shape[-1])
    out, lse = get_attention_backend("flex")(q, k, v, mask, scale)
    ref_out, ref_lse = attention_reference(q, k, v, mask, scale)
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    torch.testing.assert_close(out, ref_out, atol=FP32_ATOL, rtol=0)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse)), "flex and reference disagree on fully masked queries"
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=FP32_ATOL, rtol=0)


def test_flex_causal_gqa_odd_length():
    q, k, v = _qkv(2, 77, 77)
    _check_flex(q, k, v, AttnMask.causal(2, 77, "cpu"))


def test_flex_documents_with_anchor_and_window():
    bs, s = 2, 200
    doc = torch.zeros(bs, s, dtype=torch.int64)
    doc[0, 50:130], doc[0, 130:] = 1, 2
    doc[1, 90:] = 1
    doc[:, 0] = ANCHOR_DOC  # AnchorAttention's shared first token
    q, k, v = _qkv(bs, s, s)
    _check_flex(q, k, v, AttnMask.causal(bs, s, "cpu", doc))
    _check_flex(q, k, v, AttnMask.causal(bs, s, "cpu", doc, window=33))


def test_flex_context_parallel_blocks():
    """Zigzag shards (two chunks per rank) with arbitrary global indices, with and without documents."""
    s, cp = 256, 2
    chunk = s // (2 * cp)
    doc = (torch.arange(s) // 100)[None]  # (1, s): documents cross the shard boundaries
    ranks = [torch.cat([torch.arange(r * chunk, (r + 1) * chunk),
                        torch.arange((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)]) for r in range(cp)]
    for qi in ranks:
        for ki in ranks:
            q, k, v = _qkv(1, qi.numel(), ki.numel())
            _check_flex(q, k, v, AttnMask(qi[None], ki[None]))
            _check_flex(q, k, v, AttnMask(qi[None], ki[None], doc[:, qi], doc[:, ki]))


def test_layouts():
    bs, s = 2, 12
    assert classify(AttnMask.causal(bs, s, "cpu"), s, s).kind == "causal"
    idx = torch.arange(s)[None].expand(bs, s)
    assert classify(AttnMask(idx + 100, idx), s, s).kind == "full"
    assert classify(AttnMask(idx, idx + 100), s, s).kind == "empty"
    zig = torch.cat([torch.arange(0, 6), torch.arange(30, 36)])[None].expand(bs, s)
    assert classify(AttnMask(zig, zig), s, s).kind == "causal"
    assert classify(AttnMask(zig, idx), s, s).kind == "general"
    doc = torch.tensor([[0] * 5 + [1] * 7, [3] * 12])
    lay = classify(AttnMask.causal(bs, s, "cpu", doc), s, s)
    assert lay.kind == "varlen"
    assert lay.cu_seqlens.tolist() == [0, 5, 12, 24] and lay.max_seqlen == 12
    assert lay.segments == ((0, 0, 5), (0, 5, 12), (1, 0, 12))
    split = torch.tensor([[0] * 4 + [1] * 4 + [0] * 4, [3] * 12])  # doc 0 appears in two runs
    assert classify(AttnMask.causal(bs, s, "cpu", split), s, s).kind == "general"
    anchor = doc.clone()
    anchor[:, 0] = ANCHOR_DOC
    assert classify(AttnMask.causal(bs, s, "cpu", anchor), s, s).kind == "general"


def test_lse_gradient_folds_into_fused_backward():
    """The identity attention_sdpa uses: a flash-style backward given O' = O - dlse dO/|dO|^2 yields the
    gradient of (out, lse) that autograd computes through the reference, including under an LSE merge."""
    torch.manual_seed(1)
    bs, s, h, d = 1, 24, 2, 8
    scale = 1.0 / math.sqrt(d)
    q, k, v = (torch.randn(bs, s, h, d, requires_grad=True) for _ in range(3))
    mask = AttnMask.causal(bs, s, "cpu")
    out, lse = attention_reference(q, k, v, mask, scale)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    gq, gk, gv = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))

    # Flash-attention backward in closed form: P from the LSE, D from (dO, O'), dS = P (dP - D).
    out_b = _out_for_backward(out.detach(), dout, dlse)
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (q, k, v))  # (bs, h, s, d)
    scores = (qt @ kt.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask.dense()[:, None], float("-inf"))
    p = torch.exp(scores - lse.detach()[..., None])
    do_t, ob_t = dout.transpose(1, 2), out_b.transpose(1, 2)
    dp = do_t @ vt.transpose(-1, -2)
    ds = p * (dp - (do_t * ob_t).sum(-1, keepdim=True))
    # The reference computes in fp32 whatever the input dtype: fp32 rounding on both sides.
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close((ds @ kt * scale).transpose(1, 2), gq, **tol)
    torch.testing.assert_close((ds.transpose(-1, -2) @ qt * scale).transpose(1, 2), gk, **tol)
    torch.testing.assert_close((p.transpose(-1, -2) @ do_t).transpose(1, 2), gv, **tol)


@pytest.mark.parametrize("name", ["sdpa_flash", "sdpa_cudnn"])
def test_fused_backends_refuse_cpu(name):
    q, k, v = _qkv(1, 8, 8)
    with pytest.raises(NotImplementedError, match="CUDA"):
        get_attention_backend(name)(q.bfloat16(), k.bfloat16(), v.bfloat16(), AttnMask.causal(1, 8, "cpu"), 0.25)


@pytest.mark.parametrize("name,package", [("flash_attn", "flash-attn"), ("fa4", "flash-attn-4")])
def test_missing_packages_name_what_to_install(name, package):
    pytest.importorskip("torch")
    try:
        __import__("flash_attn.cute" if name == "fa4" else "flash_attn")
        pytest.skip(f"{package} is installed here")
    except ImportError:
        pass
    q, k, v = _qkv(1, 8, 8)
    with pytest.raises(NotImplementedError, match=f"pip install {package}"):
        get_attention_backend(name)(q, k, v, AttnMask.causal(1, 8, "cpu"), 0.25)


def test_registry_and_auto_on_cpu():
    with pytest.raises(ValueError, match="valid"):
        get_attention_backend("nope")
    for name in ATTENTION_BACKENDS:
        assert callable(get_attention_backend(name))
    q, k, v = _qkv(1, 16, 16)
    mask = AttnMask.causal(1, 16, "cpu")
    assert choose_backend(q, k, mask) == "reference"
    out, lse = get_attention_backend("auto")(q, k, v, mask, 0.25)
    ref_out, ref_lse = attention_reference(q, k, v, mask, 0.25)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_empty_block_is_zero_and_stays_in_the_graph():
    """A CP block where no query sees a key: out 0, lse -inf, and autograd over (out, lse) still works."""
    from longtrain.kernels.attention_sdpa import _empty

    q = torch.randn(2, 5, 4, 8, requires_grad=True)
    out, lse = _empty(q)
    assert torch.equal(out, torch.zeros_like(q)) and lse.shape == (2, 4, 5) and bool((lse == float("-inf")).all())
    (g,) = torch.autograd.grad((out, lse), (q,), (torch.randn_like(out), torch.randn_like(lse)))
    assert torch.equal(g, torch.zeros_like(q))


def test_flex_inside_the_model_matches_reference():
    """The decoder with `flex` attention gives the reference decoder's logits (packed documents, GQA)."""
    from longtrain.model.args import model_flavor
    from longtrain.model.decoder import Transformer

    args = model_flavor("debug")
    model = Transformer(args)
    model.init_weights(0)
    ids = torch.randint(0, args.vocab_size, (2, 40))
    doc = torch.cat([torch.zeros(2, 15, dtype=torch.int64), torch.ones(2, 25, dtype=torch.int64)], dim=1)
    with torch.no_grad():
        ref = model(ids, doc_ids=doc)
        model.set_attention(get_attention_backend("flex"))
        out = model(ids, doc_ids=doc)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)  # fp32, two layers of reordered sums


def test_dense_choice_here_resolves_auto_only_with_a_gpu() -> None:
    from longtrain.kernels.attention_auto import dense_choice_here

    # Explicit names pass through; on a machine without a GPU `auto` stays `auto` (the plan's larger candidate).
    assert dense_choice_here("sdpa_cudnn", 64) == "sdpa_cudnn"
    if not torch.cuda.is_available():
        assert dense_choice_here("auto", 64) == "auto"
