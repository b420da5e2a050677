"""`longtrain plan`: predicted per-GPU peak memory of a training step, and which memory switches make it fit.

The prediction is `torch.cuda.max_memory_allocated` of a step: the bytes alive at the step's worst moment.
It is the largest of three moments, each an accounting of the tensors alive then, per GPU:

- end of the forward (the chunked loss running): parameters, optimizer states, every layer's saved
  activations, the final norm and the loss working set. Gradients do not exist yet (`zero_grad` sets
  them to None), so with no checkpointing this moment is the peak;
- backward of the first layer it reaches (the last one): as above minus the loss, plus the output
  projection's gradient, the layer's recomputed activations and its backward working set;
- backward of layer 0: every gradient exists, only layer 0's saved activations are left (the peak with
  offload, where nothing is kept per layer on the GPU).

Where each part is counted:
- `switches.py`: the step's layout and memory switches (`StepLayout`, `MemorySwitches`) and their checks;
- `activations.py`: per token and layer, what autograd saves, what backward recomputes, its working set;
- `states.py`: parameters, gradients, optimizer states, gathers and host states per sharding engine;
- `memory.py`: the three moments, the loss working set, the buffers, `plan_memory` and `suggest`;
- `command.py`: the `longtrain plan RECIPE` command.

Calibrated against measured peaks on one H100 (docs/memory.md "Measured", docs/benchmarks.md;
tests/unit/test_memory_plan.py keeps them as regression cases). Tokens per GPU are
seq_len * micro_batch / cp. `total` excludes the CUDA context and allocator slack: `fits()` adds
`RUNTIME_OVERHEAD_BYTES` for that. Numbers are bytes; `MemoryPlan.gib()` formats them.
"""

from longtrain.plan.activations import layer_saved_bytes_per_token
from longtrain.plan.command import HOST_RESERVE_GIB, add_parser, run
from longtrain.plan.memory import GIB, RUNTIME_OVERHEAD_BYTES, SWITCH_LADDER, MemoryPlan, plan_memory, plan_step, suggest
from longtrain.plan.switches import (AC_MODES, ATTENTION_BACKENDS, DEFAULT_LOSS_CHUNK, DEFAULT_TILE_TOKENS, DTYPE_BYTES,
                                     LOSS_IMPLS, MemorySwitches, StepLayout)

__all__ = ["AC_MODES", "ATTENTION_BACKENDS", "DEFAULT_LOSS_CHUNK", "DEFAULT_TILE_TOKENS", "DTYPE_BYTES", "GIB",
           "HOST_RESERVE_GIB", "LOSS_IMPLS", "MemoryPlan", "MemorySwitches", "RUNTIME_OVERHEAD_BYTES", "SWITCH_LADDER",
           "StepLayout", "add_parser", "layer_saved_bytes_per_token", "plan_memory",
           "plan_step", "run", "suggest"]
