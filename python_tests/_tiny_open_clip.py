"""A stock open_clip config (ViT-S-32) shrunk for CPU tests, saved as a JSON file with random weights.

What a user with their own checkpoint does: ``--teacher model.json --teacher-weights model.pt`` through
``models.load_model``. The copy keeps ViT-S-32's architecture (open_clip ``CLIP``, vision transformer, text
transformer, open_clip's BPE tokenizer) with 2 layers of width 128 per tower, 32-px images in 8-px patches and a
32-token context, so embedding a few hundred images takes seconds on 2 cores.
"""

from __future__ import annotations

import copy
import json
import os

import open_clip
import pytest
import torch

from clipcid_fast.pipeline.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for a test module (import this fixture into it): on 2 cores shared with other jobs,
    two OpenMP threads ran these small forwards ~20x slower (each waits for the other to be scheduled).
    Byte-identity holds at any fixed thread count; subprocesses inherit the count they are given."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config() -> dict:
    cfg = copy.deepcopy(open_clip.get_model_config("ViT-S-32"))
    cfg["embed_dim"] = 64
    cfg["vision_cfg"].update(layers=2, width=128, patch_size=8, image_size=32)
    cfg["text_cfg"].update(layers=2, width=128, heads=2, context_length=32)
    return cfg


def write_checkpoint(folder: str, seed: int = 0) -> ModelConfig:
    """The JSON config and a state_dict of seeded random weights in ``folder``; a ModelConfig whose teacher they are."""
    os.makedirs(folder, exist_ok=True)
    cfg_path, weights_path = os.path.join(folder, "tiny-vit-s-32.json"), os.path.join(folder, f"weights-{seed}.pt")
    with open(cfg_path, "w") as f:
        json.dump(tiny_config(), f)
    torch.manual_seed(seed)
    torch.save(open_clip.model.CLIP(**tiny_config()).state_dict(), weights_path)
    return ModelConfig(teacher=cfg_path, teacher_weights=weights_path)
