"""Fixtures for the shapes world: one thread (as the trainer layer), quiet libraries."""

from __future__ import annotations

import os

import diffusers  # noqa: F401  (the layer needs the trainer extra: fail loudly, never skip)
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
