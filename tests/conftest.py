import os

import pytest
import torch

# Two cores here and in CI: keep torch from oversubscribing them when tests spawn ranks.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield
