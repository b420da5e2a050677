import sys
from pathlib import Path

# `tests.golden.cases` is imported by name (also by spawned gloo ranks): make the repository root importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
