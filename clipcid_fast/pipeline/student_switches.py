"""``--grad-checkpointing`` and ``--torchcompile``: open_clip_train's two memory / speed switches for the student.

Gradient checkpointing is open_clip's own (``set_grad_checkpointing``): its transformer towers (ViT image tower,
text transformer) recompute each block's activations in the backward instead of keeping them. open_clip has none
for a ModifiedResNet image tower (the default student's): there only the text tower recomputes, and a line says so.

``torch.compile`` compiles the student's ``encode_image`` and ``encode_text`` (what the training step calls; a
compiled ``forward`` would never run) as attributes of this instance, so its ``state_dict`` keys, checkpoints and
exported weights stay those of the plain model."""

from __future__ import annotations

import torch


def apply(model: torch.nn.Module, grad_checkpointing: bool, torchcompile: bool, say=print) -> None:
    if grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(
                f"--grad-checkpointing: the student ({type(model).__name__}) has no set_grad_checkpointing"
            )
        model.set_grad_checkpointing(True)
        visual = getattr(model, "visual", None)
        if visual is not None and type(visual).__name__ == "ModifiedResNet":
            say("--grad-checkpointing: open_clip recomputes transformer blocks only; the student's ModifiedResNet "
                "image tower keeps its activations")  # fmt: skip
    if torchcompile:
        for name in ("encode_image", "encode_text"):
            setattr(model, name, torch.compile(getattr(model, name)))
