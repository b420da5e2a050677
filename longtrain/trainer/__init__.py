"""The training loop and what it needs, one file each: train.py (the loop: `train(recipe)`), build.py (layout
and model), data.py (batch source), optim.py (AdamW + schedule), checkpoint.py (atomic DCP checkpoints),
metrics.py (bar, metrics.jsonl, wandb, loss.png), lora.py, stage_eval.py, export.py (`longtrain export`),
distributed.py (process group). Nothing is imported here, so `longtrain.trainer.flops` and friends stay light."""
