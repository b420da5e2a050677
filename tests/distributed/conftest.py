import sys
from pathlib import Path

# Spawned ranks unpickle worker functions by module name: make this folder importable.
sys.path.insert(0, str(Path(__file__).parent))
