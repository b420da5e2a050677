"""Training checkpoints: the files (`store.py`: atomic save, verify, resume state) and the one reader that turns
a checkpoint into a plain model (`model.py`), used by `longtrain export`, `longtrain eval` and the trainer alike.

Below eval/ and trainer/, above model/ and parallel/ (tests/unit/test_layers.py).
"""
