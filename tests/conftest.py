"""Test-wide settings: one torch thread per process (tiny CPU models run faster and steadier that way), and the
toy scenarios of ``fixtures_toy`` as a fixture."""

from collections.abc import Callable

import pytest
import torch

from fixtures_toy import toy_scenario as _toy_scenario
from mola.data import Scenario

torch.set_num_threads(1)


@pytest.fixture
def toy_scenario() -> Callable[..., Scenario]:
    """The ``fixtures_toy.toy_scenario`` builder: ``toy_scenario(n, task_ids=..., kind=..., ...)``."""
    return _toy_scenario


