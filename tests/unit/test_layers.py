"""Imports point down the layers (STYLE.md "Layout"): no package of longtrain imports one at its own rank or above.

Read from the source with `ast` (nothing is imported), so imports inside functions count too; imports under
`if TYPE_CHECKING:` do not (they never run: a type named in an annotation only).
"""

import ast
from pathlib import Path

import longtrain
from longtrain.data.batch import IGNORE_INDEX as BATCH_IGNORE_INDEX
from longtrain.parallel.context_parallel import CP_MODES as PARALLEL_CP_MODES
from longtrain.types import CP_MODES, IGNORE_INDEX

ROOT = Path(longtrain.__file__).parent
# Rank of each top-level module or package of longtrain: it may import only lower ranks (and itself).
RANKS = {
    "types": 0, "config_yaml": 0,
    "kernels": 1, "data": 1,  # leaves: neither imports the other, nor anything above
    "model": 2,
    "config_checks": 2.5,  # config.py runs it; it needs only the recipe it is given
    "parallel": 3, "config": 3,  # parallel.apply takes explicit arguments, never the config
    "checkpoint": 4,  # the checkpoint files and the one reader that export, eval and the trainer share
    "plan": 5, "eval": 5,
    "trainer": 6,
    "cli": 7, "__init__": 7, "__main__": 8,
}
# Upward imports that remain in files another change owns right now; each should go, and this list with it.
KNOWN: set[tuple[str, str]] = set()


def _imports(path: Path) -> set[str]:
    """The longtrain top-level names `path` imports (absolute and relative imports)."""
    rel = path.relative_to(ROOT).with_suffix("").parts
    out = set()
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            node.body = []  # cleared before the walk below: its imports are not counted
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("longtrain.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "longtrain":
                out |= {a.name for a in node.names}
            elif node.module.startswith("longtrain."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(rel[:-node.level]) + ([node.module] if node.module else [])
            if base:
                out.add(base[0])
    return out


def test_imports_point_down():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        me = rel.parts[0].removesuffix(".py")
        for other in _imports(path) - {me}:
            if RANKS[other] >= RANKS[me] and (rel.as_posix(), other) not in KNOWN:
                upward.append(f"{rel} (rank {RANKS[me]}) imports {other} (rank {RANKS[other]})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_every_package_has_a_rank():
    names = {p.name.removesuffix(".py") for p in ROOT.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert names <= set(RANKS), f"give {sorted(names - set(RANKS))} a rank in RANKS"


def test_ignore_index_is_one_value():
    assert BATCH_IGNORE_INDEX is IGNORE_INDEX  # data/batch.py re-exports the one definition in longtrain.types


def test_cp_modes_are_one_list():
    assert PARALLEL_CP_MODES is CP_MODES  # parallel/context_parallel.py imports the one definition


def test_functions_and_files_stay_small():
    """STYLE.md "small files": no function of longtrain/ over 80 lines, no file over 500 (issue 19)."""
    too_long = []
    for path in sorted(ROOT.rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > 500:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: "
                                f"{node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)
