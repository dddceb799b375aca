"""``clipcid-fast demo``: every stage on the offline default, then the report.

The regime is the one where distillation pays: the teacher learned from the clean
60k Fashion-MNIST train split; the student's corpus is a seeded 10k subset of it with 40 % of its captions
naming another class; every number is measured on the clean 10k test split. Stages, in ``out_dir``:

1. ``embed/``: the teacher embeds the student corpus (``embed.run_embed``; trains and caches the default
   teacher on first use, resumes shard by shard);
2. ``balance/``: SemDeDup of the teacher's image features (``balance.run_balance``; every eps of
   ``balance_eps_grid`` from one pass, the removed fraction of each printed; resumes itself);
3. ``cluster/``: k-means of the rows kept at ``balance_eps`` into ``n_classes`` pseudo-classes
   (``balance.run_cluster``; reused when its inputs are unchanged);
4. ``train/<recipe>-seed<seed>/``: every recipe with the same student, data and steps (``train.run_train``
   with ``resume=True``; a finished run with the same config is reused as it is); cid trains on the kept
   rows with the pseudo-classes, the others on the whole student corpus;
5. ``eval/<name>.json``: zero-shot, retrieval and linear probe of each student and the teacher
   (``evaluate.run_eval``; skipped when the JSON was written for the same weights and eval config);
6. ``report.json``, ``report.md``, ``loss_curves.png``, ``accuracy.png`` (``demo_report``).

The stage functions here are what ``benchmarks/bench_recipes.py`` runs too (several seeds and regimes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time

from omegaconf import OmegaConf

from ..recipes import RECIPES as TABLE
from .config import RECIPES, DataConfig, DemoConfig, EmbedConfig, EvalConfig, TrainConfig, build_config, to_dict

# --quick: sizes for CI (about 2-3 min on 2 cores once the quick teacher is cached). The teacher always trains on
# the whole 60k train split (models.py has no smaller teacher corpus), so one epoch instead of three is the
# cheapest teacher there is; it is cached under its own recipe key, beside (never instead of) the full one.
QUICK = {
    "steps": 20,
    "batch_size": 64,
    "train_eval_every": 10,
    "train_eval_samples": 500,
    "balance_k": 8,
    "n_classes": 20,
    "eval_samples": 1000,
    "probe_train_samples": 1000,
    "data": {"student_samples": 600},
    "models": {"teacher_epochs": 2, "teacher_samples": 10000},
}


def build_demo_config(yaml_path: str | None = None, overrides: dict | None = None) -> DemoConfig:
    """defaults ← (QUICK when quick) ← YAML ← overrides; ``quick`` itself may come from the YAML or the flags."""
    cfg = build_config(DemoConfig, yaml_path, overrides)
    if not cfg.quick:
        return cfg
    layers = [OmegaConf.create(QUICK)]
    if yaml_path:
        layers.append(OmegaConf.load(yaml_path))
    if overrides:
        layers.append(OmegaConf.create(overrides))
    return build_config(DemoConfig, None, OmegaConf.to_container(OmegaConf.merge(*layers)))


def config_from_args(args) -> DemoConfig:
    """The demo's config from parsed ``clipcid-fast demo`` flags (``--config`` YAML, ``--quick``)."""
    from .config import flag_overrides

    return build_demo_config(getattr(args, "config", None), flag_overrides(DemoConfig, args))


def recipe_list(cfg: DemoConfig) -> list[str]:
    names = [r.strip() for r in cfg.recipes.split(",") if r.strip()]
    bad = [r for r in names if r not in RECIPES]
    if bad or not names:
        raise ValueError(f"--recipes must be a comma-separated subset of {','.join(RECIPES)}, got {cfg.recipes!r}")
    return names


def check_demo_config(cfg: DemoConfig) -> None:
    recipe_list(cfg)
    for name in ("steps", "batch_size", "balance_k", "n_classes", "probe_train_samples", "train_eval_samples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_samples", "train_eval_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not 0.0 < cfg.balance_eps < 2.0:
        raise ValueError(f"--balance-eps must be in (0, 2), got {cfg.balance_eps}")
    from .balance import KEEP_OPTIONS

    if cfg.balance_keep not in KEEP_OPTIONS:
        raise ValueError(f"--balance-keep must be one of {', '.join(KEEP_OPTIONS)}, got {cfg.balance_keep!r}")
    if cfg.data.dataset != "fashion-mnist":
        raise ValueError(
            f"the demo runs on the offline default: --dataset must be fashion-mnist, got {cfg.data.dataset!r}"
        )
    if cfg.data.corpus not in ("student", "teacher"):
        raise ValueError(
            f"--corpus must be student or teacher (the student's training corpus), got {cfg.data.corpus!r}"
        )


# ---------------------------------------------------------------------------------------------------------------
# where each stage writes


@dataclasses.dataclass
class Layout:
    """The directories of one regime's stages under ``root`` (the demo's ``out_dir``). ``run_tag`` (e.g.
    ``steps300-b256``) puts the training runs and their evals in a subfolder, so several training set-ups
    share one embed / balance / cluster (the benchmark's use)."""

    root: str
    run_tag: str = ""

    @property
    def embed(self) -> str:
        return os.path.join(self.root, "embed")

    def balance(self, k: int, keep: str = "hard") -> str:
        # SemDeDup's own rule ("hard") keeps the folder name it always had
        return os.path.join(self.root, "balance", f"k{k}" if keep == "hard" else f"k{k}-{keep}")

    def cluster(self, k: int, eps: float, n_classes: int, keep: str = "hard") -> str:
        tag = "" if keep == "hard" else f"-{keep}"
        return os.path.join(self.root, "cluster", f"k{k}{tag}-eps{eps:g}-n{n_classes}")

    def train(self, recipe: str, seed: int) -> str:
        return os.path.join(self.root, "train", self.run_tag, f"{recipe}-seed{seed}")

    def eval_json(self, name: str) -> str:
        return os.path.join(self.root, "eval", self.run_tag, f"{name}.json")

    @property
    def teacher_eval_json(self) -> str:
        return os.path.join(self.root, "eval", "teacher.json")


class StageClock:
    """Seconds per stage of this run, and whether the stage's outputs were reused."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.reused: dict[str, bool] = {}

    def record(self, name: str, t0: float, reused: bool) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
        self.reused[name] = self.reused.get(name, True) and reused


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_json(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------------------
# the stages


def cached_teacher(cfg: DemoConfig) -> tuple[dict, str] | None:
    """(training record, weights file) of the cached default teacher of ``cfg``'s recipe; None when there is none
    (not trained yet, or not the default teacher)."""
    from . import models

    if cfg.models.teacher != "default" or cfg.models.teacher_weights is not None:
        return None
    model_cfg = models.default_teacher_cfg(cfg.models.context_length)
    weights, _, want = models.default_teacher_cache(model_cfg, cfg.models, cfg.data)
    want = json.loads(json.dumps(want))  # tuples -> lists, as the JSON beside the cache holds them
    rec = _read_json(weights[: -len(".pt")] + ".json")
    if rec and rec.get("recipe") == want and os.path.isfile(weights):
        return rec.get("training", {}), weights
    return None


class Teacher:
    """The frozen teacher, loaded on first need: a rerun whose stages are all done never loads it.

    ``key()`` names its weights: the sha256 of the cached default teacher's file (no load needed), else the
    loaded model's fingerprint. The default teacher is trained on first load and cached (``models``), from
    ``cfg.data``'s corpus settings as the trainer's is."""

    def __init__(self, cfg: DemoConfig) -> None:
        self.cfg = cfg
        self._loaded = None
        self._key: str | None = None

    def get(self):
        if self._loaded is None:
            from . import models

            self._loaded = models.load_model(self.cfg.models, "teacher", progress=self.cfg.progress,
                                             data_cfg=self.cfg.data)  # fmt: skip
        return self._loaded

    def key(self) -> str:
        if self._key is None:
            found = cached_teacher(self.cfg)
            if found is None:
                self.get()  # trains and caches the default teacher
                found = cached_teacher(self.cfg)
            self._key = _sha256_file(found[1]) if found else self.get().fingerprint
        return self._key


def embed_stage(cfg: DemoConfig, layout: Layout, teacher: Teacher) -> bool:
    """The teacher's features of the student corpus (the input of balance, cluster and train); True when an
    earlier run's complete features, from the same teacher weights, were reused without loading the teacher."""
    from . import embed
    from ._io import atomic_json

    stamp = os.path.join(layout.embed, "demo_teacher.json")
    done = os.path.isfile(os.path.join(layout.embed, "embed.json"))
    if done and _read_json(stamp) == {"teacher": teacher.key()}:
        return True
    ecfg = EmbedConfig(out_dir=layout.embed, model="teacher", progress=cfg.progress, data=cfg.data, models=cfg.models)
    embed.run_embed(ecfg, loaded=teacher.get())  # resumes shard by shard; refuses another model's features
    atomic_json(stamp, {"teacher": teacher.key()})
    return False


def balance_eps_list(cfg: DemoConfig) -> list[float]:
    return sorted({float(e) for e in cfg.balance_eps_grid} | {float(cfg.balance_eps)})


def embed_digest(layout: Layout) -> list[str]:
    """sha256 of each image-feature shard: what balance and cluster read (a few MB per 10k rows)."""
    folder = os.path.join(layout.embed, "image")
    return [_sha256_file(os.path.join(folder, f)) for f in sorted(os.listdir(folder)) if f.endswith(".npy")]


def balance_stage(cfg: DemoConfig, layout: Layout) -> dict:
    """SemDeDup of the teacher's image features at every eps of the grid (one pass); its summary.json (with
    ``reused``). A finished run on the same features and eps is reused as it is; an unfinished one resumes."""
    from . import balance
    from ._io import atomic_json

    out = layout.balance(cfg.balance_k, cfg.balance_keep)
    inputs = {"image_shards_sha256": embed_digest(layout), "k": cfg.balance_k, "eps": balance_eps_list(cfg)}
    if cfg.balance_keep != "hard":  # the stamps of runs with SemDeDup's own rule stay as they were
        inputs["keep"] = cfg.balance_keep
    stamp = os.path.join(out, "demo_inputs.json")
    summary = _read_json(os.path.join(out, "summary.json"))
    if summary is not None and _read_json(stamp) == inputs:
        return {**summary, "reused": True}
    summary = balance.run_balance(
        os.path.join(layout.embed, "image"),
        out,
        ids=os.path.join(layout.embed, "ids"),
        k=cfg.balance_k,
        eps=inputs["eps"],
        keep=cfg.balance_keep,
        progress=cfg.progress,
    )
    atomic_json(stamp, inputs)
    return {**summary, "reused": False}


def removed_fractions(summary: dict) -> dict[float, float]:
    return {float(r["eps"]): float(r["removed_fraction"]) for r in summary["thresholds"]}


def cluster_stage(cfg: DemoConfig, layout: Layout) -> dict:
    """Pseudo-classes of the rows kept at ``balance_eps``; reused when the features, mask and N are the same."""
    from . import balance
    from ._io import atomic_json

    out = layout.cluster(cfg.balance_k, cfg.balance_eps, cfg.n_classes, cfg.balance_keep)
    keep = balance.keep_mask_path(layout.balance(cfg.balance_k, cfg.balance_keep), cfg.balance_eps)
    inputs = {"image_shards_sha256": embed_digest(layout), "keep_sha256": _sha256_file(keep),
              "n_classes": cfg.n_classes, "seed": 0}  # fmt: skip
    topk = cfg.weights.cd_topk  # cid --cd-topk k reads each row's k nearest centres (topk.npy)
    if topk:  # (left out at 0, so the default's stamp and outputs stay what they were)
        inputs["topk"] = topk
    stamp = os.path.join(out, "demo_inputs.json")
    meta = _read_json(os.path.join(out, "cluster.json"))
    if meta is not None and _read_json(stamp) == inputs and os.path.isfile(balance.pseudo_class_paths(out)[0]):
        return {**meta, "reused": True}
    meta = balance.run_cluster(os.path.join(layout.embed, "image"), out, cfg.n_classes, keep=keep, seed=0,
                               topk=max(topk, 0))  # fmt: skip
    atomic_json(stamp, inputs)
    return {**meta, "reused": False}


def train_config(cfg: DemoConfig, layout: Layout, recipe: str, seed: int | None = None) -> TrainConfig:
    seed = cfg.seed if seed is None else seed
    cid = TABLE[recipe].labels  # balance's keep mask and cluster's pseudo-classes
    return TrainConfig(
        out_dir=layout.train(recipe, seed),
        recipe=recipe,
        teacher_cache=layout.embed if TABLE[recipe].teacher else None,
        balance_dir=layout.balance(cfg.balance_k, cfg.balance_keep) if cid else None,
        balance_eps=cfg.balance_eps,
        cluster_dir=layout.cluster(cfg.balance_k, cfg.balance_eps, cfg.n_classes, cfg.balance_keep) if cid else None,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        warmup=min(TrainConfig.warmup, max(1, cfg.steps // 10)),
        seed=seed,
        eval_every=cfg.train_eval_every,
        eval_samples=cfg.train_eval_samples,
        ckpt_every=max(1, min(TrainConfig.ckpt_every, cfg.steps)),
        resume=True,
        progress=cfg.progress,
        weights=cfg.weights,
        data=cfg.data,
        models=cfg.models,
    )


def _finished_run(tcfg: TrainConfig) -> dict | None:
    """The summary of a finished run in ``tcfg.out_dir`` written with this config, else None."""
    from .checkpoint import config_difference
    from .run_folder import comparable

    summary = _read_json(os.path.join(tcfg.out_dir, "summary.json"))
    cfg_path = os.path.join(tcfg.out_dir, "config.yaml")
    if summary is None or not os.path.isfile(cfg_path) or summary.get("final", {}).get("step") != tcfg.steps:
        return None
    saved, now, defaults = OmegaConf.to_container(OmegaConf.load(cfg_path)), to_dict(tcfg), to_dict(TrainConfig())
    # a weight the recipe does not read does not change its run (a changed cid default leaves kd's runs reused)
    reads = set(TABLE[tcfg.recipe].weights)
    for c in (saved, now, defaults):
        if isinstance(c.get("weights"), dict):
            c["weights"] = {k: v for k, v in c["weights"].items() if k in reads}
    # a field added to the config since the run, left at its default, does not change the run (as in train), nor
    # do the keys that never change a run (run_folder.NEUTRAL: out_dir, progress, ...)
    if config_difference(comparable(saved), comparable(now), ignore=(), defaults=comparable(defaults)):
        return None  # run_train will refuse it with the differences
    return summary


def train_stage(cfg: DemoConfig, layout: Layout, recipe: str, seed: int | None = None, **overrides) -> dict:
    """One recipe's run; a finished run with the same config is reused, an interrupted one resumed. ``overrides``:
    TrainConfig fields set over ``train_config``'s (``benchmarks/data_efficiency.py``: ``keep``, ``cluster_dir``)."""
    from . import train

    tcfg = dataclasses.replace(train_config(cfg, layout, recipe, seed), **overrides)
    summary = _finished_run(tcfg)
    if summary is not None:
        return {**summary, "reused": True}
    return {**train.run_train(tcfg), "reused": False}


def eval_config(cfg: DemoConfig, out: str, model: str) -> EvalConfig:
    test = DataConfig(**{**to_dict(cfg.data), "corpus": "test"})
    return EvalConfig(
        out=out,
        model=model,
        probe_train_samples=cfg.probe_train_samples,
        eval_samples=cfg.eval_samples,
        progress=cfg.progress,
        data=test,
        models=cfg.models,
    )


def _eval_key(ecfg: EvalConfig, weights_key: str) -> dict:
    return {"weights": weights_key, "eval": {k: v for k, v in to_dict(ecfg).items() if k != "progress"}}


def _stamp_of(out: str) -> str:
    return out[: -len(".json")] + ".key.json" if out.endswith(".json") else out + ".key.json"


def finished_eval(cfg: DemoConfig, out: str, model: str, weights_key: str) -> dict | None:
    """The eval JSON ``out`` if it was written for these weights and this eval config, else None."""
    result = _read_json(out)
    if result is not None and _read_json(_stamp_of(out)) == _eval_key(eval_config(cfg, out, model), weights_key):
        return result
    return None


def eval_stage(cfg: DemoConfig, out: str, model: str, weights_key: str, loaded=None) -> dict:
    """``run_eval`` of ``model`` into ``out``, skipped when ``out`` was written for the same weights and eval
    config (``weights_key``: the checkpoint's sha256, or ``Teacher.key()``; ``loaded``: the model, or a
    callable returning it, used only when the eval runs)."""
    from . import evaluate
    from ._io import atomic_json

    result = finished_eval(cfg, out, model, weights_key)
    if result is not None:
        return {**result, "reused": True}
    ecfg = eval_config(cfg, out, model)
    result = evaluate.run_eval(ecfg, loaded=loaded() if callable(loaded) else loaded)
    atomic_json(_stamp_of(out), _eval_key(ecfg, weights_key))
    return {**result, "reused": False}


def student_eval_stage(cfg: DemoConfig, layout: Layout, recipe: str, seed: int | None = None) -> dict:
    seed = cfg.seed if seed is None else seed
    student = os.path.join(layout.train(recipe, seed), "student.pt")
    return eval_stage(cfg, layout.eval_json(f"{recipe}-seed{seed}"), student, _sha256_file(student))


def teacher_eval_stage(cfg: DemoConfig, layout: Layout, teacher: Teacher) -> dict:
    return eval_stage(cfg, layout.teacher_eval_json, "teacher", teacher.key(), loaded=teacher.get)


def regime(cfg: DemoConfig) -> dict:
    """The parameters every number depends on, printed beside the numbers."""
    student = cfg.data.corpus == "student"
    return {
        "student_corpus": cfg.data.corpus,
        "student_samples": cfg.data.student_samples if student else 60000,
        "caption_noise": cfg.data.caption_noise if student else 0.0,
        "teacher_corpus": (
            f"clean train split ({cfg.models.teacher_samples or 60000} images), {cfg.models.teacher_epochs} epoch(s)"
            if cfg.models.teacher == "default"
            else cfg.models.teacher
        ),
        "eval": "clean 10k test split" + (f" (a seeded subset of {cfg.eval_samples})" if cfg.eval_samples else ""),
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "balance": {"k": cfg.balance_k, "eps": cfg.balance_eps},
        "n_classes": cfg.n_classes,
    }


# ---------------------------------------------------------------------------------------------------------------
# the whole demo


def _banner(i: int, n: int, text: str) -> None:
    print(f"\n[{i}/{n}] {text}", flush=True)


def _done(clock: StageClock, stage: str, note: str = "") -> None:
    reused = " (reused)" if clock.reused.get(stage) else ""
    print(f"  {stage}: {clock.seconds.get(stage, 0.0):.1f} s{reused}{'; ' + note if note else ''}", flush=True)


def run_demo(cfg: DemoConfig) -> dict:
    """Every stage in ``cfg.out_dir`` (each reused when done), then the report; returns report.json's dict."""
    from . import demo_report
    from .config import write_config

    check_demo_config(cfg)
    recipes = recipe_list(cfg)
    layout = Layout(cfg.out_dir)
    clock = StageClock()
    write_config(cfg, cfg.out_dir, "demo_config.yaml")
    reg = regime(cfg)
    print(f"regime: student corpus {reg['student_samples']} images, caption noise {reg['caption_noise']:g}; "
          f"teacher: {reg['teacher_corpus']}; eval: {reg['eval']}")  # fmt: skip
    n = 5
    _banner(1, n, "embed: teacher features of the student corpus (the default teacher is trained once, cached)")
    t0 = time.perf_counter()
    teacher = Teacher(cfg)
    cached = cached_teacher(cfg) is not None
    teacher.key()  # trains the default teacher on first use
    clock.record("teacher", t0, reused=cached)
    t0 = time.perf_counter()
    reused = embed_stage(cfg, layout, teacher)
    clock.record("embed", t0, reused=reused)
    _done(clock, "embed", "features of the same teacher weights reused" if reused else "")

    balance_summary = cluster_meta = None
    if any(TABLE[r].labels for r in recipes):
        _banner(2, n, f"balance: SemDeDup of the teacher's image features, k={cfg.balance_k}")
        t0 = time.perf_counter()
        balance_summary = balance_stage(cfg, layout)
        clock.record("balance", t0, reused=balance_summary["reused"])
        for eps, frac in removed_fractions(balance_summary).items():
            mark = "  <- cid trains on this mask" if eps == float(cfg.balance_eps) else ""
            print(f"  eps={eps:<8g} removed fraction {frac:.4f}{mark}")
        _done(clock, "balance")
        _banner(3, n, f"cluster: the kept rows into {cfg.n_classes} pseudo-classes")
        t0 = time.perf_counter()
        cluster_meta = cluster_stage(cfg, layout)
        clock.record("cluster", t0, reused=cluster_meta["reused"])
        sizes = cluster_meta["class_sizes"]
        print(f"  {cluster_meta['n_labelled']} rows, class sizes {sizes['min']}..{sizes['max']}, "
              f"{sizes['empty']} empty")  # fmt: skip
        _done(clock, "cluster")
    else:
        print("\n[2-3/5] balance, cluster: skipped (no cid recipe)")

    _banner(4, n, f"train: {', '.join(recipes)} ({cfg.steps} steps of {cfg.batch_size})")
    runs = {}
    for recipe in recipes:
        t0 = time.perf_counter()
        runs[recipe] = train_stage(cfg, layout, recipe)
        clock.record("train", t0, reused=runs[recipe]["reused"])
        if runs[recipe]["reused"]:
            print(f"  {recipe}: finished run reused ({layout.train(recipe, cfg.seed)})")
    _done(clock, "train")

    _banner(5, n, "eval: zero-shot, retrieval, linear probe on the held-out split")
    evals = {}
    t0 = time.perf_counter()
    evals["teacher"] = teacher_eval_stage(cfg, layout, teacher)
    clock.record("eval", t0, reused=evals["teacher"]["reused"])
    for recipe in recipes:
        t0 = time.perf_counter()
        evals[recipe] = student_eval_stage(cfg, layout, recipe)
        clock.record("eval", t0, reused=evals[recipe]["reused"])
    _done(clock, "eval")

    found = cached_teacher(cfg)
    report = demo_report.build_report(cfg, reg, recipes, runs, evals, found[0] if found else None, balance_summary,
                                      cluster_meta, clock)  # fmt: skip
    paths = demo_report.write_report(report, layout, recipes, cfg.seed)
    print()
    print(demo_report.markdown_table(report))
    print("\nreport: " + ", ".join(paths))
    return report
