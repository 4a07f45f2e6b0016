"""Test-wide settings: one torch thread per process (tiny CPU models run faster and steadier that way)."""

import torch

torch.set_num_threads(1)
