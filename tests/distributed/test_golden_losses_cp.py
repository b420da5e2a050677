"""The golden loss curve of the cp=2 ring recipe on two gloo ranks (tests/golden/cases.py)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # `tests.golden` by name, also in spawned ranks

from tests.golden.cases import CASES  # noqa: E402
from tests.golden.test_golden_losses import check_case  # noqa: E402


@pytest.mark.distributed
@pytest.mark.parametrize("name", [n for n, (world, _) in CASES.items() if world > 1])
def test_golden_losses_several_ranks(name, tmp_path):
    check_case(name, tmp_path)
