"""The native-CP peer's fix (benchmarks/peer_hf_native_cp.py): what transformers hands to SDPA on a
load-balanced context-parallel shard, with and without the all-ones attention mask. CPU, tiny Llama."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]


def load_peer():
    spec = importlib.util.spec_from_file_location("bench_peer_hf_native_cp", ROOT / "benchmarks" / "peer_hf_native_cp.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sdpa_calls(monkeypatch, model, **kwargs) -> list[dict]:
    """Run one forward and record the keyword arguments of every SDPA call (the mask, is_causal, enable_gqa)."""
    calls, sdpa = [], F.scaled_dot_product_attention

    def recorder(q, k, v, attn_mask=None, **kw):
        calls.append({"attn_mask": attn_mask, "q_heads": q.shape[1], "kv_heads": k.shape[1], **kw})
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorder)
    with torch.no_grad():
        model(**kwargs)
    return calls


@pytest.fixture
def shard():
    """Rank 0 of cp=2 under torch's head-tail load balancing of 16 tokens: chunks 0 and 3 of 4."""
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa", use_cache=False)).eval()
    positions = torch.cat([torch.arange(0, 4), torch.arange(12, 16)])[None]
    ids = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    return model, ids, positions


def test_sharded_positions_alone_make_transformers_build_a_mask(monkeypatch, shard):
    # The cause of "No available kernel": the jump 3 -> 12 reads as two packed documents, so SDPA gets an
    # explicit mask (which flash and torch's CP ring handlers reject) and repeated K/V.
    model, ids, positions = shard
    (call,) = sdpa_calls(monkeypatch, model, input_ids=ids, position_ids=positions)
    assert call["attn_mask"] is not None
    assert call["is_causal"] is False
    assert call["kv_heads"] == call["q_heads"]  # repeat_kv, no enable_gqa


def test_peer_kwargs_give_flash_compatible_sdpa(monkeypatch, shard):
    model, ids, positions = shard
    kwargs = load_peer().hf_cp_kwargs(ids, ids, positions)
    kwargs.pop("labels"), kwargs.pop("shift_labels")  # the loss is not what this test looks at
    (call,) = sdpa_calls(monkeypatch, model, **kwargs)
    assert call["attn_mask"] is None
    assert call["is_causal"] is True
    assert call.get("enable_gqa") is True and call["kv_heads"] == 2  # GQA without copying K/V
