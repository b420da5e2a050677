"""Logits parity: longtrain's decoder loaded with load_hf vs real transformers models (tiny, random, CPU, fp32).

Every architecture (Llama untied/tied/biased, Mistral with a sliding window, Qwen2 plain and with mixed
sliding layers, Qwen3) and every rope type. Sequences are 3x the original context (32 -> 96), so scaled
frequencies, dynamic/longrope length switching and the window all matter; a sensitivity check asserts that
the plain default rope would miss the tolerance, so the rope comparison cannot pass by accident.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from longtrain.model.hf import load_hf, save_hf

# Both sides run fp32 with different op orders (HF eager attention vs our reference, fused vs split rotary);
# logits are O(3) here and agree to ~5e-6. 1e-4 leaves room for op-order noise, not for a wrong rope
# (the sensitivity check below shows those differ by > 1e-2).
ATOL = 1e-4
ORIG_LEN = 32  # original_max_position_embeddings of the tiny models
SEQ_LEN = 3 * ORIG_LEN
ROPE_SENSITIVITY = 1e-2  # a wrong rope must move the logits by more than this

ARCH_CASES = {
    "llama": (LlamaConfig, {}),
    "llama-tied": (LlamaConfig, {"tie_word_embeddings": True}),
    "llama-bias": (LlamaConfig, {"attention_bias": True, "mlp_bias": True}),
    "mistral-sliding": (MistralConfig, {"sliding_window": 16}),
    "qwen2": (Qwen2Config, {}),
    "qwen2-mixed-sliding": (Qwen2Config, {"use_sliding_window": True, "sliding_window": 16, "max_window_layers": 1}),
    "qwen3": (Qwen3Config, {"head_dim": 24}),
    "qwen3-bias-tied": (Qwen3Config, {"attention_bias": True, "tie_word_embeddings": True}),
}

HEAD_DIM = 16  # dim 64 / 4 heads: 8 rotary frequencies
_THETA = {"rope_theta": 10000.0}
_ORIG = {"original_max_position_embeddings": ORIG_LEN}
# rope type -> (rope block, max_position_embeddings of its config.json). Standard types are built in
# transformers directly; toolkit types (ntk, resonance) are checked through their exported standard form.
ROPE_CASES = {
    "default": ({"rope_type": "default", **_THETA}, 4 * ORIG_LEN),
    "abf": ({"rope_type": "default", "rope_theta": 500000.0}, 4 * ORIG_LEN),
    "linear": ({"rope_type": "linear", **_THETA, "factor": 4.0}, ORIG_LEN),
    "dynamic": ({"rope_type": "dynamic", **_THETA, "factor": 4.0}, ORIG_LEN),
    "yarn": ({"rope_type": "yarn", **_THETA, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, **_ORIG},
             4 * ORIG_LEN),
    "llama3": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, **_ORIG}, 4 * ORIG_LEN),
    "longrope": ({"rope_type": "longrope", **_THETA, "factor": 4.0, **_ORIG,
                  "short_factor": [1.0 + 0.1 * i for i in range(HEAD_DIM // 2)],
                  "long_factor": [1.0 + 0.5 * i for i in range(HEAD_DIM // 2)]}, 4 * ORIG_LEN),
    "ntk": ({"rope_type": "ntk", **_THETA, "factor": 4.0}, 4 * ORIG_LEN),
    "resonance": ({"rope_type": "resonance", **_THETA, "factor": 4.0, **_ORIG}, 4 * ORIG_LEN),
}
TOOLKIT_TYPES = ("ntk", "resonance")


def build_hf(config_cls: type, tmp: Path, max_position_embeddings: int = 4 * ORIG_LEN,
             rope: dict | None = None, **overrides) -> tuple[torch.nn.Module, Path]:
    """A tiny random transformers model (all weights random, norms around 1), saved to `tmp`."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6,
              bos_token_id=1, eos_token_id=2)
    if rope is not None:
        kw["rope_parameters"] = dict(rope)
    cfg = config_cls(**kw, **overrides)
    cfg.architectures = [config_cls.__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random norms and biases too, so a swapped or dropped tensor shows in the logits.
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(tmp)
    return model, tmp


def input_ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids).logits


@pytest.mark.parametrize("case", list(ARCH_CASES))
@torch.no_grad()
def test_architecture_parity(case: str, tmp_path: Path):
    config_cls, overrides = ARCH_CASES[case]
    hf, path = build_hf(config_cls, tmp_path, **overrides)
    ours = load_hf(path)
    ids = input_ids()
    expected = hf_logits(hf, ids)
    got = ours(ids)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", list(ROPE_CASES))
@torch.no_grad()
def test_rope_parity(name: str, tmp_path: Path):
    rope, max_pos = ROPE_CASES[name]
    ids = input_ids()
    if name in TOOLKIT_TYPES:
        # Ours runs the toolkit method; transformers runs the standard type it is exported as.
        _, base = build_hf(LlamaConfig, tmp_path / "base", max_pos)
        ours = load_hf(base, rope=rope)
        out = save_hf(ours, tmp_path / "export")
        hf = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32).eval()
        assert hf.config.rope_parameters["rope_type"] == {"ntk": "default", "resonance": "longrope"}[name]
    else:
        hf, path = build_hf(LlamaConfig, tmp_path, max_pos, rope)
        ours = load_hf(path)
        assert ours.args.rope["rope_type"] == rope["rope_type"]
        assert ours.args.rope["rope_theta"] == rope["rope_theta"]
    expected = hf_logits(hf, ids)
    torch.testing.assert_close(ours(ids), expected, atol=ATOL, rtol=0)
    if name != "default":  # the same weights under the plain rope must miss: the rope really was compared
        ours.set_rope({"rope_type": "default", "rope_theta": 10000.0})
        assert (ours(ids) - expected).abs().max() > ROPE_SENSITIVITY


@torch.no_grad()
def test_packed_documents_match_separate_sequences(tmp_path: Path):
    """doc_ids with positions restarting per document == transformers run on each document alone."""
    hf, path = build_hf(Qwen3Config, tmp_path)
    ours = load_hf(path)
    ids = input_ids()[:1]
    lengths = (40, 56)
    doc_ids = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    got = ours(ids, position_ids=positions, doc_ids=doc_ids)
    expected = torch.cat([hf_logits(hf, part) for part in ids.split(lengths, dim=1)], dim=1)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_bf16_keeps_rotary_buffers_fp32(tmp_path: Path):
    _, path = build_hf(LlamaConfig, tmp_path, 4 * ORIG_LEN, ROPE_CASES["yarn"][0])
    model = load_hf(path)
    before = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(model.rotary.inv_freq, before, atol=0, rtol=0)
    cos, sin = model.rotary(torch.arange(SEQ_LEN)[None])
    assert cos.dtype == sin.dtype == torch.float32
    assert model(input_ids()).dtype == torch.bfloat16
    # Loading straight into bf16 gives the same fp32 buffer.
    assert load_hf(path, dtype=torch.bfloat16).rotary.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
@torch.no_grad()
def test_rope_seq_len_fixes_length_dependent_frequencies(name: str, tmp_path: Path):
    """A shard of a sequence (here a causal prefix) computed with the full length's rope frequencies equals the
    full forward on those tokens; with its own length it does not (why context parallelism passes it)."""
    rope, max_pos = ROPE_CASES[name]
    _, path = build_hf(LlamaConfig, tmp_path, max_pos, rope)
    model = load_hf(path)
    ids, cut = input_ids(), ORIG_LEN - 8  # alone, the prefix would not scale at all (within the original length)
    full = model.hidden_states(ids)[:, :cut]
    torch.testing.assert_close(model.hidden_states(ids[:, :cut], rope_seq_len=SEQ_LEN), full, atol=ATOL, rtol=0)
    assert (model.hidden_states(ids[:, :cut]) - full).abs().max() > ROPE_SENSITIVITY
