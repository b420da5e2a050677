"""Our exports as transformers 4.x reads them.

1. Pure JSON (always runs): read config.json the way 4.x does (top-level `rope_theta` + `rope_scaling`,
   ignoring `rope_parameters`) and check it is the same rope as transformers 5's `rope_parameters`, with the
   details 4.57 needs (PITFALLS.md: longrope `factor`, yarn betas as floats, original length present).
2. A real transformers 4.57 (runs when LONGTRAIN_TF4_PYTHON points at the python of a venv that has it, e.g.
   built by scripts/check_transformers4.sh): loads every exported directory in a subprocess and must give our
   logits, with no rope warning.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_model_parity import ARCH_CASES, ATOL, ROPE_CASES, ROPE_SENSITIVITY, build_hf, input_ids

from longtrain import load_hf, save_hf
from longtrain.model.args import model_flavor
from longtrain.model.decoder import Transformer
from longtrain.model.rope import export_rope

TF4_PYTHON = os.environ.get("LONGTRAIN_TF4_PYTHON")


def legacy_rope(cfg: dict) -> dict:
    """The rope a transformers 4.x reader runs: rope_scaling (None: default) with the top-level rope_theta."""
    scaling = dict(cfg.get("rope_scaling") or {"rope_type": "default"})
    scaling.setdefault("rope_type", scaling.pop("type", "default"))
    return {"rope_theta": cfg.get("rope_theta", 10000.0), **scaling}


@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_config_json_as_transformers4_reads_it(name: str, tmp_path: Path):
    rope, max_pos = ROPE_CASES[name]
    model = Transformer(model_flavor("debug", rope=rope, max_position_embeddings=max_pos))
    model.init_weights(seed=0)
    cfg = json.loads((save_hf(model, tmp_path / "out") / "config.json").read_text())
    assert legacy_rope(cfg) == cfg["rope_parameters"]
    assert cfg["rope_parameters"] == export_rope(rope, max_pos, head_dim=model.args.head_dim)[0]
    rope_type = cfg["rope_parameters"]["rope_type"]
    assert (cfg["rope_scaling"] is None) == (rope_type == "default")  # 4.x convention for the plain rope
    if rope_type in ("yarn", "llama3", "longrope"):
        assert isinstance(cfg["rope_scaling"]["original_max_position_embeddings"], int)
    if rope_type == "longrope":
        assert isinstance(cfg["rope_scaling"]["factor"], float)  # 4.57 raises TypeError without it
    for key in ("rope_theta", "factor", "beta_fast", "beta_slow", "attention_factor", "low_freq_factor"):
        if key in cfg["rope_parameters"]:
            assert isinstance(cfg["rope_parameters"][key], float), key  # 4.57 warns on integer betas


# The transformers 4.57 side: load each directory, run the ids, report max |logits - ours| and rope warnings.
_TF4_SCRIPT = r"""
import json, logging, sys
import torch, transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
assert transformers.__version__.startswith("4."), transformers.__version__
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
transformers.logging.get_logger("transformers").addHandler(Keep())
jobs = json.loads(sys.argv[1])
result = {"version": transformers.__version__}
for name, job in jobs.items():
    del records[:]
    data = load_file(job["tensors"])
    model = AutoModelForCausalLM.from_pretrained(job["dir"], attn_implementation="eager", torch_dtype=torch.float32)
    with torch.no_grad():
        logits = model.eval()(data["ids"]).logits
    result[name] = {"max_diff": (logits - data["logits"]).abs().max().item(),
                    "rope_scaling": model.config.rope_scaling, "rope_theta": model.config.rope_theta,
                    "warnings": [r for r in records if "rope" in r.lower()]}
print(json.dumps(result))
"""


@pytest.mark.skipif(TF4_PYTHON is None, reason="set LONGTRAIN_TF4_PYTHON to a python with transformers 4.57 "
                                               "(scripts/check_transformers4.sh builds one)")
@torch.no_grad()
def test_transformers4_loads_exports_with_our_logits(tmp_path: Path):
    ids = input_ids()
    jobs: dict[str, dict] = {}

    def export(name: str, model: Transformer) -> None:
        out = save_hf(model, tmp_path / name)
        save_file({"ids": ids, "logits": model(ids).contiguous()}, tmp_path / f"{name}.safetensors")
        jobs[name] = {"dir": str(out), "tensors": str(tmp_path / f"{name}.safetensors")}

    sources: dict[int, Path] = {}  # one Llama checkpoint per max_position_embeddings, every rope applied to it
    for name, (rope, max_pos) in ROPE_CASES.items():
        if max_pos not in sources:
            sources[max_pos] = build_hf(ARCH_CASES["llama"][0], tmp_path / f"src-{max_pos}", max_pos)[1]
        export(f"rope-{name}", load_hf(sources[max_pos], rope=rope))
    for name, (config_cls, overrides) in ARCH_CASES.items():
        _, src = build_hf(config_cls, tmp_path / f"src-{name}", **overrides)
        export(f"arch-{name}", load_hf(src))
    # longrope whose factor is not max_position_embeddings / original (4.x would derive another attention factor).
    mismatch = {**ROPE_CASES["longrope"][0], "factor": 8.0}
    export("rope-longrope-factor-8", load_hf(sources[ROPE_CASES["longrope"][1]], rope=mismatch))
    # Control (PITFALLS.md): the yarn export without the legacy keys, as transformers 5 alone writes it;
    # 4.x silently runs the default rope on it, so this one must miss.
    export("control-no-legacy", load_hf(sources[ROPE_CASES["yarn"][1]], rope=ROPE_CASES["yarn"][0]))
    control_cfg = json.loads((tmp_path / "control-no-legacy" / "config.json").read_text())
    del control_cfg["rope_scaling"], control_cfg["rope_theta"]
    (tmp_path / "control-no-legacy" / "config.json").write_text(json.dumps(control_cfg))
    proc = subprocess.run([TF4_PYTHON, "-c", _TF4_SCRIPT, json.dumps(jobs)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4.57"), result["version"]
    assert result.pop("control-no-legacy")["max_diff"] > ROPE_SENSITIVITY
    del jobs["control-no-legacy"]
    for name, job in jobs.items():
        got = result[name]
        cfg = json.loads((Path(job["dir"]) / "config.json").read_text())
        assert got["rope_theta"] == cfg["rope_theta"] and got["rope_scaling"] == cfg["rope_scaling"], name
        assert got["warnings"] == [], (name, got["warnings"])
        assert got["max_diff"] <= ATOL, (name, got["max_diff"])

