"""RoPE registry: parity with transformers' rope functions and LlamaRotaryEmbedding, toolkit methods against
independent formulas and through their exported form, precision at long positions, validation errors."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from longtrain.model.rope import (ROPE_METHODS, RotaryEmbedding, apply_rotary, compute_inv_freq, context_length,
                                  export_rope, hf_max_position_embeddings, validate_rope)

# transformers computes inv_freq in fp32 (a pow and a division: a few ulps, ulp = 6e-8 relative); ours is fp64.
RTOL_INV_FREQ = 1e-6
# cos/sin at positions < 256: both sides form fp32 angles from fp32 inv_freq that may differ by a few ulps, so
# the angle differs by up to ~256 * 2e-7 ~ 5e-6 rad.
ATOL_COS_SIN = 1e-5

HEAD_DIM = 16
ORIG = 64  # original (pretraining) length of the test configs; positions go to 3x beyond it


def hf_config(rope: dict, max_position_embeddings: int, head_dim: int = HEAD_DIM) -> LlamaConfig:
    return LlamaConfig(hidden_size=64, num_attention_heads=64 // head_dim, head_dim=head_dim,
                       max_position_embeddings=max_position_embeddings, rope_parameters=dict(rope))


def hf_inv_freq(rope: dict, max_position_embeddings: int, seq_len: int | None = None,
                head_dim: int = HEAD_DIM) -> tuple[torch.Tensor, float]:
    config = hf_config(rope, max_position_embeddings, head_dim)
    if rope["rope_type"] == "default":  # transformers 5 keeps `default` outside ROPE_INIT_FUNCTIONS
        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope["rope_type"]](config, seq_len=seq_len)


def longrope_lists(n: int) -> tuple[list[float], list[float]]:
    return [1.0 + 0.05 * i for i in range(n)], [1.0 + 0.9 * i for i in range(n)]


SHORT, LONG = longrope_lists(HEAD_DIM // 2)

# (id, rope block, config.json max_position_embeddings, seq_len given to the init function)
STANDARD_CASES = [
    ("default", {"rope_type": "default", "rope_theta": 10000.0}, ORIG, None),
    ("default-abf", {"rope_type": "default", "rope_theta": 5_000_000.0}, 4 * ORIG, None),
    ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4}, ORIG, None),
    ("dynamic-short", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, ORIG, ORIG // 2),
    ("dynamic-3x", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0}, ORIG, 3 * ORIG),
    ("dynamic-10x", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, ORIG, 10 * ORIG),
    ("yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG},
     4 * ORIG, None),
    ("yarn-betas-notrunc", {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0, "beta_fast": 16,
                            "beta_slow": 2, "truncate": False, "original_max_position_embeddings": ORIG},
     8 * ORIG, None),
    ("yarn-mscale", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "mscale": 0.707,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": ORIG}, 40 * ORIG, None),
    ("yarn-attention-factor", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "attention_factor": 1.3,
                               "original_max_position_embeddings": ORIG}, 4 * ORIG, None),
    ("llama3", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": ORIG}, 16 * ORIG, None),
    # tiny original length so the three llama3 bands (kept / smoothed / divided) all occur in 8 frequencies
    ("llama3-bands", {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 200}, 800, None),
    ("longrope-short", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                        "factor": 4.0, "original_max_position_embeddings": ORIG}, 4 * ORIG, ORIG),
    ("longrope-long", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
                       "factor": 4.0, "original_max_position_embeddings": ORIG}, 4 * ORIG, ORIG + 1),
    ("longrope-no-factor", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                            "long_factor": LONG, "original_max_position_embeddings": ORIG}, 16 * ORIG, 3 * ORIG),
    ("longrope-attention-factor", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT,
                                   "long_factor": LONG, "factor": 4.0, "attention_factor": 1.1,
                                   "original_max_position_embeddings": ORIG}, 4 * ORIG, 3 * ORIG),
    ("partial-linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0, "partial_rotary_factor": 0.5},
     ORIG, None),
    ("partial-yarn", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "partial_rotary_factor": 0.5,
                      "original_max_position_embeddings": ORIG}, 4 * ORIG, None),
    ("partial-longrope", {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT[:4],
                          "long_factor": LONG[:4], "factor": 4.0, "partial_rotary_factor": 0.5,
                          "original_max_position_embeddings": ORIG}, 4 * ORIG, 3 * ORIG),
]


@pytest.mark.parametrize("rope,max_pos,seq_len", [c[1:] for c in STANDARD_CASES], ids=[c[0] for c in STANDARD_CASES])
def test_inv_freq_and_scaling_match_transformers(rope, max_pos, seq_len):
    ours, scaling = compute_inv_freq(rope, HEAD_DIM, max_pos, seq_len)
    ref, ref_scaling = hf_inv_freq(rope, max_pos, seq_len)
    assert ours.dtype == torch.float64 and ours.device.type == "cpu"
    torch.testing.assert_close(ours, ref.double(), rtol=RTOL_INV_FREQ, atol=0)
    assert math.isclose(scaling, ref_scaling, rel_tol=1e-12)


def test_default_partial_rotary_matches_transformers_linear_factor_one():
    # Llama's default ignores partial_rotary_factor; linear with factor 1 honours it and is the same rope.
    ours, _ = compute_inv_freq({"rope_theta": 10000.0, "partial_rotary_factor": 0.25}, HEAD_DIM, ORIG)
    ref, _ = hf_inv_freq({"rope_type": "linear", "rope_theta": 10000.0, "factor": 1.0,
                          "partial_rotary_factor": 0.25}, ORIG)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, ref.double(), rtol=RTOL_INV_FREQ, atol=0)


def test_every_registered_type_is_covered():
    covered = {c[1]["rope_type"] for c in STANDARD_CASES} | {"ntk", "resonance"}
    assert covered == set(ROPE_METHODS)


# ---- toolkit methods: independent formulas, and the exported form computed by transformers

def test_ntk_formula_and_export():
    rope = {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 8.0}
    d = HEAD_DIM
    theta = 10000.0 * 8.0 ** (d / (d - 2))  # bloc97's NTK-aware base
    expected = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ours, scaling = compute_inv_freq(rope, d, 8 * ORIG)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    assert scaling == 1.0
    # the lowest frequency is interpolated by exactly `factor`, the highest kept
    base, _ = compute_inv_freq({"rope_theta": 10000.0}, d, ORIG)
    assert ours[0] == 1.0 and math.isclose(base[-1] / ours[-1], 8.0, rel_tol=1e-12)

    exported, max_pos = export_rope(rope, 8 * ORIG, head_dim=d)
    assert exported == {"rope_type": "default", "rope_theta": pytest.approx(theta, rel=1e-12)}
    assert max_pos == 8 * ORIG
    ref, ref_scaling = hf_inv_freq(exported, max_pos)
    torch.testing.assert_close(ours, ref.double(), rtol=RTOL_INV_FREQ, atol=0)
    assert ref_scaling == 1.0


def resonance_oracle(base_type: str, d: int = HEAD_DIM) -> tuple[torch.Tensor, float]:
    """Resonance RoPE computed here: the base method's frequencies with wavelengths rounded to integers."""
    i = torch.arange(d // 2, dtype=torch.float64)
    match base_type:
        case "linear":
            inv, scaling = 10000.0 ** (-2 * i / d) / 4.0, 1.0
        case "ntk":
            inv, scaling = (10000.0 * 4.0 ** (d / (d - 2))) ** (-2 * i / d), 1.0
        case "yarn":  # yarn itself is checked against transformers above; take transformers' (fp32) values
            inv, scaling = hf_inv_freq({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                        "original_max_position_embeddings": ORIG}, 4 * ORIG)
            inv = inv.double()
    return 2 * math.pi / torch.round(2 * math.pi / inv), scaling


@pytest.mark.parametrize("base_type", ["linear", "yarn", "ntk"])
def test_resonance_formula_and_export(base_type):
    rope = {"rope_type": "resonance", "base_type": base_type, "rope_theta": 10000.0, "factor": 4.0,
            "original_max_position_embeddings": ORIG}
    ours, scaling = compute_inv_freq(rope, HEAD_DIM, 4 * ORIG)
    wavelengths = 2 * math.pi / ours
    torch.testing.assert_close(wavelengths, wavelengths.round(), rtol=0, atol=1e-9)  # whole positions
    expected, expected_scaling = resonance_oracle(base_type)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=0)
    assert math.isclose(scaling, expected_scaling, rel_tol=1e-7)

    exported, max_pos = export_rope(rope, 4 * ORIG, head_dim=HEAD_DIM)
    assert exported["rope_type"] == "longrope" and max_pos == 4 * ORIG
    assert exported["short_factor"] == exported["long_factor"] and len(exported["short_factor"]) == HEAD_DIM // 2
    assert exported["factor"] == 4.0 and exported["original_max_position_embeddings"] == ORIG
    for seq_len in (ORIG, 3 * ORIG):  # both factor sets are the same, so no switch at the original length
        ref, ref_scaling = hf_inv_freq(exported, max_pos, seq_len)
        torch.testing.assert_close(ours, ref.double(), rtol=RTOL_INV_FREQ, atol=0)
        assert math.isclose(ref_scaling, scaling, rel_tol=1e-12)


# ---- the module: cos/sin against LlamaRotaryEmbedding beyond the original length

MODULE_CASES = [c for c in STANDARD_CASES if not c[0].startswith("partial") and c[0] != "dynamic-short"] + [
    ("ntk", {"rope_type": "ntk", "rope_theta": 10000.0, "factor": 4.0}, 4 * ORIG, None),
    ("resonance-yarn", {"rope_type": "resonance", "rope_theta": 10000.0, "factor": 4.0,
                        "original_max_position_embeddings": ORIG}, 4 * ORIG, None),
    ("resonance-linear", {"rope_type": "resonance", "base_type": "linear", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": ORIG}, 4 * ORIG, None),
]


@pytest.mark.parametrize("rope,max_pos", [c[1:3] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
@pytest.mark.parametrize("seq_len", [ORIG // 2, 3 * ORIG])
def test_cos_sin_match_llama_rotary_embedding(rope, max_pos, seq_len):
    hf_rope, hf_max_pos = export_rope(rope, max_pos, head_dim=HEAD_DIM)
    hf = LlamaRotaryEmbedding(hf_config(hf_rope, hf_max_pos))  # fresh: transformers' dynamic rope keeps state
    ours = RotaryEmbedding(rope, HEAD_DIM, max_pos)
    position_ids = torch.arange(seq_len).repeat(2, 1)  # (2, seq_len) int64
    cos, sin = ours(position_ids)
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=torch.float32), position_ids)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (2, seq_len, HEAD_DIM)
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=ATOL_COS_SIN)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=ATOL_COS_SIN)


def test_longrope_switches_with_length_and_explicit_seq_len():
    rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": SHORT, "long_factor": LONG,
            "factor": 4.0, "original_max_position_embeddings": ORIG}
    rotary = RotaryEmbedding(rope, HEAD_DIM, 4 * ORIG)
    short_inv = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM) / torch.tensor(SHORT)
    long_inv = 10000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM) / torch.tensor(LONG)
    pos = torch.tensor([[ORIG - 1]])  # a single position; its angle reveals the frequencies used
    for seq_len, inv in ((None, short_inv), (ORIG + 1, long_inv)):  # a CP shard passes the global length
        cos, _ = rotary(pos, seq_len=seq_len)
        expected = torch.cos(torch.cat([inv, inv]) * (ORIG - 1)) * rotary.attention_scaling
        torch.testing.assert_close(cos[0, 0].double(), expected, rtol=0, atol=ATOL_COS_SIN)
    cos_long, _ = rotary(torch.tensor([[ORIG - 1, ORIG]]))  # max position ORIG: length ORIG + 1 > original
    torch.testing.assert_close(cos_long[0, 0].double(), torch.cos(torch.cat([long_inv, long_inv]) * (ORIG - 1))
                               * rotary.attention_scaling, rtol=0, atol=ATOL_COS_SIN)


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_apply_rotary_matches_transformers_on_the_rotated_channels(partial):
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "partial_rotary_factor": partial,
            "original_max_position_embeddings": ORIG}
    cos, sin = RotaryEmbedding(rope, HEAD_DIM, 4 * ORIG)(torch.arange(3 * ORIG)[None])
    q = torch.randn(1, 3 * ORIG, 4, HEAD_DIM)  # (bs, s, n_heads, head_dim)
    rot = cos.shape[-1]
    ref, _ = apply_rotary_pos_emb(q[..., :rot], q[..., :rot], cos, sin, unsqueeze_dim=2)
    out = apply_rotary(q, cos, sin)
    torch.testing.assert_close(out, torch.cat([ref, q[..., rot:]], dim=-1), rtol=0, atol=1e-6)  # fp32 both
    assert apply_rotary(q.bfloat16(), cos, sin).dtype == torch.bfloat16


# ---- precision

def test_fp64_angles_beat_fp32_at_one_million():
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    position_ids = (1_000_000 + torch.arange(64)).repeat(1, 1)  # (1, 64) int64
    inv64 = 500000.0 ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    angles = position_ids[..., None].double() * inv64
    oracle_cos = torch.cat([angles, angles], -1).cos()  # float64 oracle
    cos, _ = RotaryEmbedding(rope, HEAD_DIM, 2_000_000)(position_ids)
    ref_cos, _ = LlamaRotaryEmbedding(hf_config(rope, 2_000_000))(torch.zeros(1), position_ids)  # fp32 angles
    ours_err = (cos.double() - oracle_cos).abs().max().item()
    fp32_err = (ref_cos.double() - oracle_cos).abs().max().item()
    assert ours_err < 1e-6  # only the final fp32 rounding of cos
    assert fp32_err > 1e-3 and ours_err < fp32_err / 100


def test_buffers_stay_fp32_under_bf16_and_values_survive():
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG}
    container = torch.nn.Sequential(torch.nn.Linear(4, 4), RotaryEmbedding(rope, HEAD_DIM, 4 * ORIG))
    before = container[1].inv_freq.clone()
    container.to(torch.bfloat16)
    assert container[0].weight.dtype == torch.bfloat16
    assert container[1].inv_freq.dtype == torch.float32
    torch.testing.assert_close(container[1].inv_freq, before, rtol=0, atol=0)
    cos, sin = container[1](torch.arange(10)[None])
    assert cos.dtype == sin.dtype == torch.float32
    container.half().float()
    torch.testing.assert_close(container[1].inv_freq, before, rtol=0, atol=0)


def test_built_on_meta_then_materialised_keeps_the_fp64_master():
    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": ORIG}
    reference = RotaryEmbedding(rope, HEAD_DIM, 16 * ORIG)
    with torch.device("cpu"):
        rotary = RotaryEmbedding(rope, HEAD_DIM, 16 * ORIG)
    rotary.to("meta").to_empty(device="cpu")  # as a model built on meta and materialised after sharding
    assert rotary.inv_freq.dtype == torch.float32
    torch.testing.assert_close(rotary.inv_freq, reference.inv_freq, rtol=0, atol=0)


def test_positions_must_be_int64():
    rotary = RotaryEmbedding({"rope_theta": 10000.0}, HEAD_DIM, ORIG)
    with pytest.raises(ValueError, match="int64.*int32"):
        rotary(torch.arange(8, dtype=torch.int32)[None])


# ---- validation and export rules

def test_validate_normalises():
    r = validate_rope({"type": "yarn", "factor": 4, "original_max_position_embeddings": 8192.0, "rope_theta": 10000})
    assert r == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8192,
                 "beta_fast": 32.0, "beta_slow": 1.0}
    assert list(r)[:2] == ["rope_type", "rope_theta"]
    assert isinstance(r["factor"], float) and isinstance(r["original_max_position_embeddings"], int)
    assert validate_rope({"rope_theta": 1e4}) == {"rope_type": "default", "rope_theta": 10000.0}
    res = validate_rope({"rope_type": "resonance", "rope_theta": 1e4, "factor": 2, "original_max_position_embeddings": 8})
    assert res["base_type"] == "yarn" and "beta_fast" not in res
    # null optional keys (as some config.json files carry) mean "not set" and are not written back
    lr = validate_rope({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": [1, 2], "long_factor": [3, 4],
                        "factor": None, "attention_factor": None, "original_max_position_embeddings": 64})
    assert "factor" not in lr and "attention_factor" not in lr and lr["short_factor"] == [1.0, 2.0]
    with pytest.raises(ValueError, match=r"rope\.factor is missing"):
        validate_rope({"rope_type": "yarn", "rope_theta": 1e4, "factor": None, "original_max_position_embeddings": 8})


BAD = [
    ({"rope_type": "ropey", "rope_theta": 1e4}, ["stage.rope_type", "'ropey'", "default, linear, dynamic, yarn"]),
    ({"rope_type": "linear", "rope_theta": 1e4}, ["stage.factor is missing", "rope_theta, factor"]),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}, ["stage.rope_theta is missing"]),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 1.0, "original_max_position_embeddings": 64},
     ["stage.factor = 1.0", "factor > 1"]),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5}, ["stage.factor = 0.5", "factor > 1"]),
    ({"rope_type": "longrope", "rope_theta": 1e4, "factor": 0.5, "short_factor": SHORT, "long_factor": LONG,
      "original_max_position_embeddings": 64}, ["stage.factor = 0.5", ">= 1"]),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64},
     ["stage.original_max_position_embeddings is not a key of the Hugging Face rope_type 'linear'", "allowed"]),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64, "alpha": 1},
     ["stage.alpha", "yarn", "beta_fast"]),
    ({"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0, "short_factor": SHORT[:5], "long_factor": LONG[:5],
      "original_max_position_embeddings": 64}, ["stage.short_factor", "5 entries", "rotary_dim / 2 = 8"]),
    ({"rope_type": "longrope", "rope_theta": 1e4, "factor": 4.0, "short_factor": SHORT, "long_factor": LONG[:7],
      "original_max_position_embeddings": 64}, ["stage.long_factor", "as many entries as short_factor"]),
    ({"rope_type": "longrope", "rope_theta": 1e4, "short_factor": SHORT, "long_factor": LONG[:-1] + [-1.0],
      "original_max_position_embeddings": 64}, ["stage.long_factor", "> 0"]),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 1.0, "beta_slow": 2.0,
      "original_max_position_embeddings": 64}, ["stage.beta_fast = 1.0", "> beta_slow"]),
    ({"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 64}, ["stage.high_freq_factor", "> low_freq_factor"]),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": -64},
     ["stage.original_max_position_embeddings = -64", "positive integer"]),
    ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64,
      "truncate": "yes"}, ["stage.truncate", "true or false"]),
    ({"rope_theta": "1e6"}, ["stage.rope_theta = '1e6'", "must be a number", "1.0e6"]),
    ({"rope_theta": True}, ["stage.rope_theta = True", "must be a number"]),
    ({"rope_theta": 1.0}, ["stage.rope_theta = 1.0", "> 1"]),
    ({"rope_theta": 1e4, "partial_rotary_factor": 1.5}, ["stage.partial_rotary_factor = 1.5", "(0, 1]"]),
    ({"rope_theta": 1e4, "partial_rotary_factor": 0.3125}, ["stage.partial_rotary_factor = 0.3125", "rotates 5",
                                                            "even"]),
    ({"rope_type": "resonance", "base_type": "dynamic", "rope_theta": 1e4, "factor": 2.0,
      "original_max_position_embeddings": 64}, ["stage.base_type = 'dynamic'", "linear, yarn, ntk"]),
    ({"rope_type": "resonance", "base_type": "linear", "rope_theta": 1e4, "factor": 2.0, "beta_fast": 8.0,
      "original_max_position_embeddings": 64}, ["stage.beta_fast", "only for base_type yarn"]),
    ({"rope_type": "resonance", "rope_theta": 1e4, "factor": 2.0}, ["stage.original_max_position_embeddings is missing"]),
    ({"rope_type": "linear", "type": "yarn", "rope_theta": 1e4, "factor": 2.0}, ["stage.type", "conflicts"]),
    ([("rope_theta", 1e4)], ["stage must be a mapping"]),
]


@pytest.mark.parametrize("rope,parts", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_rope_blocks_raise_clear_errors(rope, parts):
    with pytest.raises(ValueError) as err:
        validate_rope(rope, "stage", head_dim=HEAD_DIM)
    for part in parts:
        assert part in str(err.value), f"{part!r} not in: {err.value}"


def test_bad_blocks_also_fail_when_building_the_module():
    with pytest.raises(ValueError, match=r"rope\.factor is missing"):
        RotaryEmbedding({"rope_type": "linear", "rope_theta": 1e4}, HEAD_DIM, ORIG)
    with pytest.raises(ValueError, match="needs head_dim"):
        export_rope({"rope_type": "ntk", "rope_theta": 1e4, "factor": 2.0}, ORIG)
    with pytest.raises(ValueError, match="max_position_embeddings = 0"):
        export_rope({"rope_theta": 1e4}, 0)


def test_export_rules_for_standard_types():
    yarn = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4, "beta_fast": 32, "beta_slow": 1,
            "original_max_position_embeddings": 8192}
    out, max_pos = export_rope(yarn, 8192)  # a stale max_position_embeddings is corrected to original * factor
    assert max_pos == 32768 and out["factor"] == 4.0
    assert all(isinstance(out[k], float) for k in ("beta_fast", "beta_slow", "factor", "rope_theta"))
    lr = {"rope_type": "longrope", "rope_theta": 1e4, "short_factor": SHORT, "long_factor": LONG,
          "original_max_position_embeddings": 4096}
    out, max_pos = export_rope(lr, 131072)
    assert out["factor"] == 32.0 and max_pos == 131072  # factor always written (transformers 4.57 needs it)
    assert export_rope({"rope_type": "linear", "rope_theta": 1e4, "factor": 4}, 4096)[1] == 4096
    assert export_rope({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4}, 4096)[1] == 4096
    llama3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
              "original_max_position_embeddings": 8192}
    assert export_rope(llama3, 131072) == (validate_rope(llama3), 131072)
    assert export_rope({"rope_theta": 5e5}, 65536) == ({"rope_type": "default", "rope_theta": 5e5}, 65536)


def transformers_rope_warnings(rope_parameters: dict, max_position_embeddings: int) -> list[str]:
    """Build a LlamaConfig and return the rope-related warnings transformers logs while validating it."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    tf_logger = logging.getLogger("transformers")
    tf_logger.addHandler(handler)
    try:
        config = hf_config(rope_parameters, max_position_embeddings)
    finally:
        tf_logger.removeHandler(handler)
    assert config.rope_parameters["rope_type"] == rope_parameters["rope_type"]
    return [m for m in messages if "rope" in m.lower()]


def test_transformers_warns_on_unknown_rope_keys():  # the control for the next test: the capture works
    bad = {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0, "original_max_position_embeddings": 64}
    assert any("Unrecognized keys" in m for m in transformers_rope_warnings(bad, ORIG))


@pytest.mark.parametrize("rope,max_pos", [c[1:3] for c in MODULE_CASES], ids=[c[0] for c in MODULE_CASES])
def test_exported_blocks_load_in_transformers_without_rope_warnings(rope, max_pos):
    exported, hf_max_pos = export_rope(rope, max_pos, head_dim=HEAD_DIM)
    assert transformers_rope_warnings(exported, hf_max_pos) == []


def test_context_length_round_trip():
    cases = [({"rope_type": "linear", "rope_theta": 1e4, "factor": 4.0}, 4096, 16384),
             ({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 4096, 8192),
             ({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 4096},
              16384, 16384),
             ({"rope_type": "ntk", "rope_theta": 1e4, "factor": 4.0}, 16384, 16384)]
    for rope, max_pos, context in cases:
        assert context_length(rope, max_pos) == context
        assert hf_max_position_embeddings(rope, context) == max_pos
