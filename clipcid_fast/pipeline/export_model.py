"""``clipcid-fast export MODEL --out DIR``: a model as an open_clip ``local-dir:`` folder that needs no clipcid_fast.

The folder holds what open_clip's ``create_model_and_transforms("local-dir:DIR")`` and
``get_tokenizer("local-dir:DIR")`` read (open_clip/factory.py, 3.x), and nothing that points outside it::

    open_clip_config.json        {"model_cfg": ..., "preprocess_cfg": ..., "clipcid_fast": {"source", "fingerprint"}}
    open_clip_model.safetensors  every parameter and buffer (open_clip loads it strictly)
    tokenizer files              the Hugging Face tokenizer's (get_tokenizer reads them from DIR itself whenever
                                 text_cfg names an hf_tokenizer_name), with its folder's config.json

Why a folder and not the checkpoint: ``open_clip.create_model(name, pretrained="student.pt")`` looks for a state_dict
at the top of the file or under ``state_dict``; a ``clipcid-fast train`` checkpoint nests it under ``model`` beside
its ``model_cfg``, so open_clip finds no weights in it.

``model_cfg`` names its text files by the Hub repository they come from (``assets.TextAsset.hub_id``; a user's own
folder by its base name): open_clip ignores that name for the tokenizer of a ``local-dir:`` folder, and it is the
right one if the folder is uploaded to the Hub. A Hugging Face text *tower* (the default teacher's MiniLM) is the
one thing open_clip does not look up in DIR: it builds the tower's architecture with transformers' ``AutoConfig``
from ``text_cfg.hf_model_name``, i.e. from the Hub or the HF cache; offline, pass
``text_cfg={**model_cfg["text_cfg"], "hf_model_name": DIR}`` (DIR holds that ``config.json``; README shows it). The
weights come from the safetensors file either way (``hf_model_pretrained`` is false).

The folder is written under a temporary name beside DIR and renamed into place, so DIR is never half-written; a
non-empty DIR is replaced only with ``--force``. No resolved config is written beside it (unlike the other stages):
those settings hold paths of this machine, and the folder is meant to travel; ``clipcid_fast.fingerprint`` ties it
to the weights it came from.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import time
import uuid

from . import assets
from .models import CLIP_KWARGS, LoadedModel, custom_text, preprocess_settings

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"  # the first name open_clip's _find_checkpoint_in_dir prefers
# what transformers' AutoTokenizer / AutoConfig read from a folder (a folder has the ones its tokenizer uses);
# the tower's weights (model.safetensors, ...) are not copied: they are in WEIGHTS_FILE
HF_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
            "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
            "tokenizer.model")  # fmt: skip


def check_out(out: str, force: bool) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder without ``--force`` (before any model is loaded)."""
    if not out:
        raise ValueError("--out: name the folder to write, got an empty string")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out: {out!r} is a file, not a folder")
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise ValueError(f"--out: {out!r} is not empty (pass --force to replace it)")


def _hub_name(value: str) -> str:
    asset = assets.asset_of(value)
    return asset.hub_id if asset is not None else os.path.basename(os.path.normpath(value))


def open_clip_config(loaded: LoadedModel) -> dict:
    """``open_clip_config.json``: the model config open_clip builds the same model from, the eval transform, and
    where the weights came from."""
    cfg = loaded.model_cfg
    model_cfg = {k: copy.deepcopy(cfg[k]) for k in CLIP_KWARGS if k in cfg}
    if custom_text(cfg):
        model_cfg["custom_text"] = True
    text = model_cfg["text_cfg"]
    for key in assets.TEXT_KEYS:
        if text.get(key):
            text[key] = _hub_name(text[key])
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False  # the tower's weights are in WEIGHTS_FILE
    source = loaded.name if not os.path.isfile(loaded.name) else os.path.basename(loaded.name)
    return {
        "model_cfg": model_cfg,
        "preprocess_cfg": preprocess_settings(cfg),
        "clipcid_fast": {"source": source, "fingerprint": loaded.fingerprint},
    }


def _hf_files(loaded: LoadedModel) -> list[str]:
    """Paths of the Hugging Face files to copy: the tokenizer folder's, then the text tower's config.json."""
    text = assets.resolved(loaded.model_cfg, "model").get("text_cfg", {})
    out = []
    if text.get("hf_tokenizer_name"):
        out += [os.path.join(text["hf_tokenizer_name"], f) for f in HF_FILES]
    if text.get("hf_model_name"):
        out.append(os.path.join(text["hf_model_name"], "config.json"))
    return [p for p in out if os.path.isfile(p)]


def _write(loaded: LoadedModel, folder: str) -> list[str]:
    from safetensors.torch import save_file

    for path in _hf_files(loaded):
        shutil.copyfile(path, os.path.join(folder, os.path.basename(path)))
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(open_clip_config(loaded), f, indent=2, sort_keys=True)
        f.write("\n")
    # clones: safetensors refuses tensors that share storage, and open_clip loads every key strictly
    state = {k: v.detach().cpu().contiguous().clone() for k, v in loaded.model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        os.chmod(path, 0o666 & ~umask)  # safetensors writes its file owner-only; the folder is meant to be shared
        with open(path, "rb") as f:  # durable before the rename makes the folder visible
            os.fsync(f.fileno())
    return sorted(os.listdir(folder))


def export_model(loaded: LoadedModel, out: str, *, force: bool = False) -> list[str]:
    """Write ``loaded`` as an open_clip ``local-dir:`` folder ``out`` (atomically); the names of its files."""
    check_out(out, force)
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = f"{out}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp)
    try:
        files = _write(loaded, tmp)
        if os.path.exists(out):  # empty, or --force: moved aside, then removed once the new folder is in place
            old = f"{out}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
    return files


def run_export(cfg) -> list[str]:
    """``clipcid-fast export``: load ``cfg.model`` as every command does (``models.load_model``), export it."""
    from .models import load_model

    t0 = time.perf_counter()
    check_out(cfg.out, cfg.force)
    loaded = load_model(cfg.models, cfg.model, progress=cfg.progress, data_cfg=cfg.data)
    files = export_model(loaded, cfg.out, force=cfg.force)
    print(f"exported {loaded.name} (weights {loaded.fingerprint[:12]}) to {cfg.out}: {', '.join(files)}")
    print(f'load it with open_clip.create_model_and_transforms("local-dir:{cfg.out}") and '
          f'open_clip.get_tokenizer("local-dir:{cfg.out}")')  # fmt: skip
    if "hf_model_name" in loaded.model_cfg.get("text_cfg", {}):
        print("its text tower is a Hugging Face model: open_clip reads its architecture from the Hub / HF cache, or "
              "offline from this folder (README, 'Using a trained model elsewhere')")  # fmt: skip
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return files
