import os

import pytest
import torch

import blt
from tests.helpers import TEXT

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def text_ids():
    return blt.encode(TEXT)[None]
