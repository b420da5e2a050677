"""load_hf / save_hf: round trips through real transformers, the dual-written rope config, sharding, dtypes,
tokenizer files, atomic writes, and one clear error per kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast
from test_model_parity import ARCH_CASES, ATOL, ORIG_LEN, ROPE_CASES, build_hf, input_ids

from longtrain import load_hf, save_hf
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.model.rope import context_length, export_rope, validate_rope

# Keys transformers adds or renames on its own; the rest of a round-tripped config must be identical.
_VOLATILE = {"transformers_version", "_name_or_path", "dtype", "torch_dtype"}


def hf_from(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def write_config(path: Path, **changes) -> None:
    cfg = read_config(path)
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def make_tokenizer(path: Path, model_max_length: int) -> Path:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            model_max_length=model_max_length).save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("case", list(ARCH_CASES))
@torch.no_grad()
def test_round_trip_through_transformers(case: str, tmp_path: Path):
    """HF dir -> load_hf -> save_hf -> transformers: same logits, equivalent config, no lm_head when tied."""
    config_cls, overrides = ARCH_CASES[case]
    hf, src = build_hf(config_cls, tmp_path / "src", **overrides)
    out = save_hf(load_hf(src), tmp_path / "out")
    ids = input_ids()
    torch.testing.assert_close(hf_from(out)(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)
    before = {k: v for k, v in AutoConfig.from_pretrained(src).to_dict().items() if k not in _VOLATILE}
    after = {k: v for k, v in AutoConfig.from_pretrained(out).to_dict().items() if k not in _VOLATILE}
    assert after == before
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not hf.config.tie_word_embeddings)


@pytest.mark.parametrize("name", list(ROPE_CASES))
@torch.no_grad()
def test_rope_config_written_for_both_readers(name: str, tmp_path: Path):
    """Each rope type: config.json carries the exported block in both forms, and transformers 5 and
    load_hf read it back as that rope (same logits as the model that wrote it)."""
    rope, max_pos = ROPE_CASES[name]
    _, src = build_hf(LlamaConfig, tmp_path / "src", max_pos)
    ours = load_hf(src, rope=rope)
    out = save_hf(ours, tmp_path / "out")
    cfg = read_config(out)
    want_rope, want_max_pos = export_rope(rope, max_pos, head_dim=ours.args.head_dim)
    assert cfg["rope_parameters"] == want_rope
    assert cfg["max_position_embeddings"] == want_max_pos
    legacy = {"rope_theta": cfg["rope_theta"], **(cfg["rope_scaling"] or {"rope_type": "default"})}
    assert legacy == cfg["rope_parameters"]  # transformers 4.x reads exactly what 5 reads
    assert AutoConfig.from_pretrained(out).rope_parameters == want_rope
    again = load_hf(out)
    assert again.args.rope == validate_rope(want_rope) and again.args.max_position_embeddings == want_max_pos
    ids = input_ids()
    expected = ours(ids)
    torch.testing.assert_close(again(ids), expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(hf_from(out)(ids).logits, expected, atol=ATOL, rtol=0)


@torch.no_grad()
def test_reads_transformers4_config_form(tmp_path: Path):
    """A 4.x config.json (top-level rope_theta + rope_scaling with the old `type` key) loads as that rope."""
    hf, src = build_hf(LlamaConfig, tmp_path, ORIG_LEN, {"rope_type": "linear", "rope_theta": 20000.0, "factor": 4.0})
    cfg = read_config(src)
    del cfg["rope_parameters"]
    cfg.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 4.0})
    (src / "config.json").write_text(json.dumps(cfg))
    model = load_hf(src)
    assert model.args.rope == {"rope_type": "linear", "rope_theta": 20000.0, "factor": 4.0}
    ids = input_ids()
    torch.testing.assert_close(model(ids), hf(ids).logits, atol=ATOL, rtol=0)


@torch.no_grad()
def test_longrope_written_for_transformers4(tmp_path: Path):
    """4.x takes longrope's original length from a top-level key and its attention factor from
    max_position_embeddings / original: both are pinned so that it runs what transformers 5 runs."""
    rope, max_pos = ROPE_CASES["longrope"]
    _, src = build_hf(LlamaConfig, tmp_path / "src", max_pos)
    ours = load_hf(src, rope={**rope, "factor": 8.0})  # not max_pos / original = 4
    out = save_hf(ours, tmp_path / "out")
    cfg = read_config(out)
    assert cfg["original_max_position_embeddings"] == ORIG_LEN
    assert cfg["rope_scaling"]["attention_factor"] == cfg["rope_parameters"]["attention_factor"] \
        == pytest.approx(ours.rotary.attention_scaling, abs=0)
    ids = input_ids()
    torch.testing.assert_close(hf_from(out)(ids).logits, ours(ids), atol=ATOL, rtol=0)
    torch.testing.assert_close(load_hf(out)(ids), ours(ids), atol=ATOL, rtol=0)


def test_disagreeing_rope_forms_are_refused(tmp_path: Path):
    _, src = build_hf(LlamaConfig, tmp_path, ORIG_LEN, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})
    write_config(src, rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match=r"config\.json.*rope_scaling.*disagree with rope_parameters"):
        load_hf(src)
    write_config(src, rope_scaling=None, rope_parameters={**ROPE_CASES["yarn"][0]}, original_max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"config\.json: original_max_position_embeddings=64 disagrees"):
        load_hf(src)


def test_unknown_config_keys_are_kept(tmp_path: Path):
    _, src = build_hf(LlamaConfig, tmp_path / "src")
    write_config(src, pad_token_id=0, my_note="kept")
    out = save_hf(load_hf(src), tmp_path / "out")
    cfg = read_config(out)
    assert cfg["pad_token_id"] == 0 and cfg["my_note"] == "kept"


# ---------------------------------------------------------------------------------------------------------------
# Files: shards, dtype, tokenizer, atomicity


@torch.no_grad()
def test_sharded_save_loads_in_both(tmp_path: Path):
    hf, src = build_hf(LlamaConfig, tmp_path / "src")
    model = load_hf(src)
    out = save_hf(model, tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    tensors = {k: v for f in files for k, v in load_file(out / f).items()}
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:  # only a tensor larger than the limit may exceed it, alone in its shard
        sizes = [t.numel() * t.element_size() for t in load_file(out / f).values()]
        assert sum(sizes) <= 40_000 or len(sizes) == 1
    again = load_hf(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    ids = input_ids()
    torch.testing.assert_close(hf_from(out)(ids).logits, hf(ids).logits, atol=ATOL, rtol=0)


def test_bf16_export_and_load(tmp_path: Path):
    _, src = build_hf(LlamaConfig, tmp_path / "src")
    out = save_hf(load_hf(src), tmp_path / "out", dtype=torch.bfloat16)
    cfg = read_config(out)
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    model = load_hf(out)  # dtype=None: the config's
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.rotary.inv_freq.dtype == torch.float32
    assert {p.dtype for p in load_hf(out, dtype=torch.float32).parameters()} == {torch.float32}


def test_tokenizer_copied_with_model_max_length(tmp_path: Path):
    rope, max_pos = ROPE_CASES["linear"]
    _, src = build_hf(LlamaConfig, tmp_path / "src", max_pos, rope)
    make_tokenizer(src, model_max_length=max_pos)
    model = load_hf(src)
    out = save_hf(model, tmp_path / "out")  # tokenizer from the recorded source directory
    expected = context_length(rope, max_pos)
    assert expected == 4 * ORIG_LEN  # linear keeps max_position_embeddings; the context is factor x longer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == expected
    assert tok("hello world").input_ids == [3, 4]
    other = make_tokenizer(tmp_path / "tok", model_max_length=7)
    out2 = save_hf(model, tmp_path / "out2", tokenizer_dir=other)
    assert json.loads((out2 / "tokenizer_config.json").read_text())["model_max_length"] == expected
    src.rename(tmp_path / "moved")  # the recorded source is gone: say so rather than drop the tokenizer
    with pytest.raises(ValueError, match=r"model\.args\.source_dir .* is not a directory; pass tokenizer_dir="):
        save_hf(model, tmp_path / "out3")
    model.args.source_dir = None
    assert not (save_hf(model, tmp_path / "out3") / "tokenizer_config.json").exists()


def test_write_is_atomic(tmp_path: Path):
    _, src = build_hf(LlamaConfig, tmp_path / "src")
    model = load_hf(src)
    out = save_hf(model, tmp_path / "out")
    with pytest.raises(ValueError, match=r"out exists and is not empty; pass overwrite=True"):
        save_hf(model, out)
    # A failure half-way (a corrupt tokenizer_config.json, read after the weights are written) leaves
    # neither a partial target nor the temporary directory behind.
    bad_tok = make_tokenizer(tmp_path / "tok", 8)
    (bad_tok / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(json.JSONDecodeError):
        save_hf(model, tmp_path / "new", tokenizer_dir=bad_tok)
    assert not (tmp_path / "new").exists()
    with pytest.raises(json.JSONDecodeError):
        save_hf(model, out, tokenizer_dir=bad_tok, overwrite=True)
    assert (out / "model.safetensors").exists()  # the old export is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "tok"]
    save_hf(model, out, overwrite=True, dtype=torch.bfloat16)
    assert read_config(out)["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src", "tok"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one clear error each


def _rewrite_weights(path: Path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return build_hf(LlamaConfig, tmp_path / "src")[1]


def test_error_unknown_architecture(src: Path):
    write_config(src, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"config\.json: architectures=\['GPT2LMHeadModel'\] is not supported; "
                                         r"supported: LlamaForCausalLM, MistralForCausalLM"):
        load_hf(src)
    write_config(src, architectures=None, model_type="gpt2")
    with pytest.raises(ValueError, match=r"architectures=None is not supported; supported: LlamaForCausalLM"):
        load_hf(src)
    write_config(src, model_type="llama")  # no architectures: taken from model_type, as transformers does
    assert load_hf(src).args.architecture == "LlamaForCausalLM"


def test_error_missing_tensor(src: Path):
    _rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj\.weight'\].*"
                                         r"in model\.safetensors"):
        load_hf(src)


def test_error_shape_mismatch(src: Path):
    _rewrite_weights(src, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.k_proj\.weight' "
                                         r"has shape \(64, 64\), config\.json implies \(32, 64\)"):
        load_hf(src)


def test_error_unexpected_tensor(src: Path):
    _rewrite_weights(src, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    with pytest.raises(ValueError, match=r"model\.safetensors: unexpected tensor "
                                         r"'model\.layers\.0\.self_attn\.q_norm\.weight' for LlamaForCausalLM"):
        load_hf(src)


def test_error_tied_head_differs(src: Path):
    write_config(src, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"tie_word_embeddings=true but 'lm_head\.weight' differs"):
        load_hf(src)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "bogus"}, r"load_hf\(rope=\)\.rope_type = 'bogus' is unknown; valid: default, linear"),
    ({"rope_type": "yarn", "rope_theta": 1e4, "original_max_position_embeddings": 32},
     r"load_hf\(rope=\)\.factor is missing"),
    ({"rope_type": "linear", "rope_theta": 1e4, "factor": 1.0}, r"load_hf\(rope=\)\.factor = 1\.0 is invalid"),
])
def test_error_invalid_rope_argument(src: Path, rope: dict, message: str):
    with pytest.raises(ValueError, match=message):
        load_hf(src, rope=rope)


def test_error_invalid_rope_in_config(src: Path):
    write_config(src, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 0.5})
    with pytest.raises(ValueError, match=r"config\.json:rope\.factor = 0\.5 is invalid"):
        load_hf(src)


def test_error_bin_only(src: Path):
    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"only PyTorch \.bin weights \(pytorch_model\.bin\); longtrain reads "
                                         r"safetensors only.*save_pretrained"):
        load_hf(src)


def test_error_missing_directory_or_config(tmp_path: Path, src: Path):
    with pytest.raises(FileNotFoundError, match=r"nowhere is not a directory"):
        load_hf(tmp_path / "nowhere")
    (src / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json does not exist"):
        load_hf(src)


def test_error_index_names_missing_shard(tmp_path: Path):
    _, src = build_hf(LlamaConfig, tmp_path / "src")
    out = save_hf(load_hf(src), tmp_path / "out", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    (out / shard).unlink()
    with pytest.raises(ValueError, match=rf"index\.json lists {shard}, which does not exist"):
        load_hf(out)


def test_error_unsupported_activation(src: Path):
    write_config(src, hidden_act="gelu")
    with pytest.raises(NotImplementedError, match=r"hidden_act='gelu'"):
        load_hf(src)


@pytest.mark.parametrize("arch, flags, lost", [
    ("LlamaForCausalLM", {"qk_norm": True}, "qk_norm=True"),
    ("Qwen2ForCausalLM", {"qkv_bias": False}, "qkv_bias=False"),
    ("MistralForCausalLM", {"sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]},
     "sliding_window=8, layer_types"),
])
def test_error_export_cannot_express(tmp_path: Path, arch: str, flags: dict, lost: str):
    """A model whose features its architecture's transformers class lacks is refused, nothing written."""
    model = Transformer(model_flavor("debug", architecture=arch, **flags))
    with pytest.raises(NotImplementedError, match=rf"save_hf: {arch} in transformers cannot express {lost}"):
        save_hf(model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
