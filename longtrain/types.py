"""Values every layer shares, at the bottom of the import graph: this module imports nothing of longtrain.

kernels/, data/, model/, parallel/ and trainer/ read these from here, so that no layer imports a sibling or
a layer above it for a constant.
"""

# A label equal to IGNORE_INDEX is not scored (torch cross_entropy's ignore_index; Hugging Face uses it too).
IGNORE_INDEX = -100

# A key token whose document id is ANCHOR_DOC is visible to queries of every document
# (AnchorAttention, arXiv:2411.13476: the first token is a shared attention sink).
ANCHOR_DOC = -1

# Context-parallel modes (parallel/context_parallel.py implements them; config.py and check-parallel offer them):
# ring, all-gather K/V, Ulysses head sharding, and Ulysses x ring / Ulysses x all-gather.
CP_MODES = ("ring", "allgather", "ulysses", "hybrid", "hybrid_allgather")

__all__ = ["ANCHOR_DOC", "CP_MODES", "IGNORE_INDEX"]
