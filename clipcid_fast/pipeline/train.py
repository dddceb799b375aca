"""The thin trainer: one readable loop; recipes are the library's loss compositions (``recipes.py``); exact resume.

``run_train(cfg)`` trains the student of ``cfg.models`` on ``cfg.data`` with ``cfg.recipe``:

1. teacher features come from the cache ``clipcid-fast embed`` wrote (``--teacher-cache``, read by sample
   id, memory-mapped), checked against the teacher (weights fingerprint) and the dataset, so a step costs
   the student and the loss only; ``--online-teacher`` runs the frozen teacher every step instead;
2. ``cid`` trains on the rows ``clipcid-fast balance`` kept (``--balance-dir``, ``--balance-eps``) with the
   pseudo-classes of ``clipcid-fast cluster`` (``--cluster-dir``); ``--keep MASK.npy`` instead picks the cache
   rows of any recipe that reads the cache (``keep_rows.py``);
3. AdamW (no weight decay on gains, biases and logit scales, open_clip's rule), linear warm-up then cosine,
   gradient-norm clipping, the student's logit scale clamped to ln 100 after every step (open_clip), bf16
   autocast on CUDA and fp32 on CPU (bf16 matmul is slow on these CPUs);
4. every step appends one JSON line to ``metrics.jsonl`` (loss, each term, lr, logit scale; eval lines
   too) and nothing that depends on wall time, so an interrupted-and-resumed run writes the same file as
   an uninterrupted one; speed goes to the progress bar and ``summary.json``;
5. checkpoints (``checkpoint.py``) every ``--ckpt-every`` steps and at the end; ``--resume`` continues
   bit for bit from the latest (weights, recipe parameters, optimizer, scheduler, RNG, data position: the step on
   the map-style sources, the stream's position with ``--dataset wds``, ``stream.py``);
6. a non-finite loss stops the run with the step and every term, leaving the last good checkpoint;
7. ``--augment SPEC --views K``: each sample of each epoch trains on one of K augmented views, the teacher's
   features of that view read from a cache embedded with the same setting (``augment.py``, ``batches.py``).

Outputs in ``out_dir``: ``config.yaml``, ``metrics.jsonl``, ``checkpoints/step-*.pt`` (+ ``.sha256``), ``student.pt``
(weights + model config: ``clipcid-fast eval --model out_dir/student.pt``), ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import numpy as np
import torch

from ..recipes import RECIPES as TABLE
from ..recipes import Recipe
from . import checkpoint, data, embed, evaluate, models, preempt, reporting, run_folder, student_switches
from ._io import atomic_bytes, atomic_json, atomic_torch, clean_tmp
from .augment import Views, views_of
from .batches import BatchBuilder, SampleStream
from .comm import Comm, local_rank, run_stage
from .config import RECIPES, TrainConfig, to_dict, write_config
from .keep_rows import check_keep_flags, load_keep
from .progress import tqdm
from .step import LOGIT_SCALE_MAX, TrainStep

__all__ = ["LOGIT_SCALE_MAX", "Prepared", "prepare", "run_train"]


# ---------------------------------------------------------------------------------------------------------------
# inputs: teacher cache, balance mask, pseudo-classes (each read by the stage that wrote it)


def _cid_inputs(cfg: TrainConfig, emb: dict, keep_row: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, str]:
    """(kept cache rows as bool [n], pseudo-class per cache row [n] — or, with ``--cd-topk k``, its k nearest
    centres [n, k] —, centroids path). ``keep_row``: the ``--keep`` mask, which stands for ``--balance-dir``'s."""
    from .balance import load_keep_mask, load_pseudo_classes, load_pseudo_topk

    n = len(emb["ids"])
    if cfg.cluster_dir is None:
        raise ValueError("recipe cid needs --cluster-dir (the output of clipcid-fast cluster)")
    topk = cfg.weights.cd_topk
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 0:
        raise ValueError(f"--cd-topk must be an integer >= 0, got {topk!r}")
    labels, cent_path = load_pseudo_classes(cfg.cluster_dir, emb["image"])
    keep = np.ones(n, dtype=bool)
    if keep_row is not None:
        keep = keep_row
    elif cfg.balance_dir is not None:
        keep = load_keep_mask(cfg.balance_dir, cfg.balance_eps, n)
    kept = keep & (labels >= 0)
    return kept, (load_pseudo_topk(cfg.cluster_dir, labels, topk) if topk else labels), cent_path


# ---------------------------------------------------------------------------------------------------------------
# optimizer and schedule


def _student_param_groups(model: torch.nn.Module, wd: float) -> list[dict]:
    """open_clip's rule: no weight decay on 1-D parameters (gains, biases) and the logit scale."""
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "logit_scale" in n or "bn" in n or "ln" in n else decay).append(p)
    return [
        {"params": decay, "weight_decay": wd, "lr_mult": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0},
    ]


def _schedule(cfg: TrainConfig):
    warm, total = max(cfg.warmup, 0), cfg.steps

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


# ---------------------------------------------------------------------------------------------------------------
# the loop


def _autocast(cfg: TrainConfig, device: torch.device):
    """A factory of the step's autocast context (bf16 on CUDA by default, fp32 on CPU)."""
    if cfg.precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"--precision must be auto, fp32 or bf16, got {cfg.precision!r}")
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    if bf16:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _check(cfg: TrainConfig, world: int = 1) -> None:
    if cfg.recipe not in RECIPES:
        raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}; got {cfg.recipe!r}")
    for name in ("steps", "batch_size", "ckpt_every", "accum_freq", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for flag, value, ok, rule in (
        ("--lr", cfg.lr, cfg.lr > 0, "> 0"),
        ("--wd", cfg.wd, cfg.wd >= 0, ">= 0"),
        ("--grad-clip", cfg.grad_clip, cfg.grad_clip >= 0, ">= 0"),
        ("--eps", cfg.eps, cfg.eps > 0, "> 0"),
        ("--beta1", cfg.beta1, 0 <= cfg.beta1 < 1, "in [0, 1)"),
        ("--beta2", cfg.beta2, 0 <= cfg.beta2 < 1, "in [0, 1)"),
    ):
        if not (ok and math.isfinite(value)):  # NaN fails every comparison: it is named here, not at step 1
            raise ValueError(f"{flag} must be finite and {rule}, got {value}")
    reporting.parse(cfg.report_to)
    reads_cache = TABLE[cfg.recipe].labels or (TABLE[cfg.recipe].teacher and not cfg.online_teacher)
    check_keep_flags(cfg.keep, cfg.balance_dir, TABLE[cfg.recipe].labels, reads_cache, cfg.recipe)
    if cfg.local_loss and cfg.recipe != "distill":
        raise ValueError(
            f"--local-loss applies to --recipe distill (open_clip's DistillClipLoss); {cfg.recipe}'s losses are over "
            "the global batch on every rank"
        )
    if cfg.batch_size % (world * cfg.accum_freq):
        raise ValueError(
            f"--batch-size {cfg.batch_size} must be a multiple of world size x --accum-freq = {world} x "
            f"{cfg.accum_freq}: every rank's micro-batches have equal size"
        )


def _cache_views(views: Views, meta: dict, path: str) -> None:
    """``--augment`` / ``--views`` / ``--augment-seed`` must be the ones the teacher cache was embedded with: its
    ``image_views`` are the teacher's features of exactly those crops."""
    recorded = meta.get("views")
    if recorded is None:
        raise ValueError(f"--augment {views.spec.canonical()!r}: --teacher-cache {path!r} holds no views (embedded "
                         "without --augment); embed it with --views K --augment SPEC")  # fmt: skip
    have = views.record()
    for key, flag in (("augment", "--augment"), ("views", "--views"), ("augment_seed", "--augment-seed")):
        if have[key] != recorded.get(key):
            raise ValueError(f"{flag} {have[key]!r} differs from --teacher-cache {path!r}'s views (augment "
                             f"{recorded.get('augment')!r}, views {recorded.get('views')}, augment_seed "
                             f"{recorded.get('augment_seed')})")  # fmt: skip


def _quiet(line: str) -> None:
    """A ``say`` for the ranks that do not print."""


def _local_device() -> torch.device:
    """This rank's device: GPU ``LOCAL_RANK`` (made the current device: Triton and CUDA events use the current
    one, and every rank left on GPU 0 would launch there), else the CPU."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def _comm(device: torch.device) -> Comm:
    return Comm(backend="nccl" if device.type == "cuda" else "gloo", device=device)


@dataclasses.dataclass
class Prepared:
    """Everything a training step needs, built as ``run_train`` builds it (``prepare``); nothing written.

    ``batch(i)`` is this rank's share of step ``i``'s global batch (CPU tensors), ``step(batch)`` runs one
    optimiser step on it (``step.TrainStep``) and returns its terms as device tensors."""

    cfg: TrainConfig
    comm: Comm
    device: torch.device
    student: models.LoadedModel
    teacher: models.LoadedModel | None
    model: torch.nn.Module
    recipe: Recipe
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: SampleStream  # or stream_train.StreamedBatches (--dataset wds), which builds the batches itself
    builder: BatchBuilder | None
    step: TrainStep
    train_samples: int
    dataset_samples: int
    num_classes: int | None

    def batch(self, i: int) -> dict:
        if self.builder is None:  # streamed: steps in order, from the start or the resumed data position
            return self.stream.batch(i)
        return self.builder(self.stream.rows(i), self.stream.epochs(i))


def prepare(cfg: TrainConfig, comm: Comm | None = None) -> Prepared:
    """Models, data, teacher cache, pseudo-classes, recipe, optimizer and step of ``cfg`` on this rank.

    Under ``torchrun`` rank 0 loads the teacher first (a default teacher is trained once and cached) while
    the others wait; a failure on any rank is raised on every rank."""
    device = _local_device()
    comm = comm if comm is not None else _comm(device)
    _check(cfg, comm.world)
    views = views_of(cfg.augment, cfg.views, cfg.augment_seed)
    if views is not None and cfg.data.dataset == "wds":
        raise ValueError("--augment: the trainer makes views of the map-style sources (fashion-mnist, csv), "
                         "not --dataset wds")  # fmt: skip

    # -- models
    torch.manual_seed(cfg.seed)
    student = models.load_model(cfg.models, "student", seed=cfg.seed, data_cfg=cfg.data)
    teacher = None
    if TABLE[cfg.recipe].teacher:
        load = lambda: models.load_model(cfg.models, "teacher", progress=cfg.progress, data_cfg=cfg.data)  # noqa: E731
        teacher = run_stage(comm, load, root_only=True) if comm.world > 1 else None
        teacher = teacher if comm.rank == 0 and teacher is not None else load()

    # -- data
    streamed = cfg.data.dataset == "wds"  # an iterable source: stream_train.py
    dataset = None if streamed else data.build_dataset(cfg.data, student.preprocess, student.tokenizer)
    ds_ids = None if streamed else np.asarray(dataset.ids, dtype=np.int64)
    train_index = None if streamed else np.arange(len(dataset))
    cache = labels = centroids = kept_rows = None
    cached_teacher = teacher is not None and not cfg.online_teacher
    if cached_teacher or TABLE[cfg.recipe].labels:  # the pseudo-classes are indexed by cache row, online or not
        emb = embed.load_teacher_cache(cfg.teacher_cache, cfg.recipe, teacher, to_dict(cfg.data))
        cache = {"image": emb["image"], "text": emb["text"], "row_of": emb["row_of"]}
        if views is not None and cached_teacher:
            _cache_views(views, emb["meta"], cfg.teacher_cache)
            cache["views"] = emb["image_views"]
        # --keep (any recipe reading the cache; _check refused it elsewhere): the cache rows this run trains on
        kept_rows = load_keep(cfg.keep, len(emb["ids"])) if cfg.keep is not None else None
    if streamed:  # every sample's id is looked up as it is read (a missing one is an error naming its shard)
        from .stream_train import StreamedBatches

        if TABLE[cfg.recipe].labels:
            kept_rows, labels, centroids = _cid_inputs(cfg, emb, kept_rows)
        stream = StreamedBatches(cfg, comm, student, cache, labels, kept_rows)
        builder, n_train, n_data = None, stream.train_samples, stream.dataset_samples
    elif cached_teacher:
        missing = ~np.isin(ds_ids, np.asarray(emb["ids"]))
        if missing.any():
            raise ValueError(
                f"--teacher-cache lacks {int(missing.sum())} of the dataset's samples (e.g. id {ds_ids[missing][0]})"
            )
    if not streamed:
        if TABLE[cfg.recipe].labels:
            kept_rows, labels, centroids = _cid_inputs(cfg, emb, kept_rows)
        if kept_rows is not None:  # cid's kept rows, or --keep's
            train_index = train_index[np.isin(ds_ids, np.asarray(emb["ids"])[kept_rows])]
        if cfg.batch_size > len(train_index):  # the stream would repeat rows in a batch: a sample its own negative
            kept = " (the rows --keep keeps)" if cfg.keep is not None else ""
            kept = kept or (" (the rows cid keeps)" if TABLE[cfg.recipe].labels else "")
            raise ValueError(
                f"--batch-size {cfg.batch_size} is larger than the {len(train_index)} training rows{kept}: a batch "
                "would hold the same sample twice; use a smaller --batch-size"
            )
        stream = SampleStream(len(train_index), cfg.batch_size, cfg.seed, rank=comm.rank, world_size=comm.world)
        builder = BatchBuilder(dataset, train_index, cache, labels, views=views, seed=cfg.seed)
        n_train, n_data = len(train_index), len(dataset)
    t_scale = None
    if teacher is not None:
        # on the step's device: the loss ops refuse a scale on another device than the features, and the online
        # teacher encodes the step's batch where it is (both stayed on the CPU: every teacher recipe failed on CUDA)
        t_scale = teacher.model.logit_scale.detach().exp().clone().to(device)
        if cfg.online_teacher:
            teacher.model.to(device)

    # -- recipe, optimizer, schedule
    t_dim = teacher.info["embed_dim"] if teacher is not None else student.info["embed_dim"]
    recipe = Recipe(cfg.recipe, cfg.weights, student.info["embed_dim"], t_dim, centroids=centroids, impl=cfg.impl,
                    rank=comm.rank, world_size=comm.world, local_loss=cfg.local_loss,
                    gather_with_grad=cfg.gather_with_grad)  # fmt: skip
    model = student.model.to(device).train()
    student_switches.apply(model, cfg.grad_checkpointing, cfg.torchcompile, say=print if comm.rank == 0 else _quiet)
    recipe.to(device)
    groups = _student_param_groups(model, cfg.wd) + recipe.param_groups(cfg.wd)
    for g in groups:
        g["lr"] = cfg.lr * g.pop("lr_mult")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _schedule(cfg))
    step = TrainStep(model, recipe, opt, sched, device=device, comm=comm, accum_freq=cfg.accum_freq,
                     grad_clip=cfg.grad_clip, autocast=_autocast(cfg, device), dedup_captions=cfg.dedup_captions,
                     teacher=teacher.model if teacher is not None and cfg.online_teacher else None,
                     teacher_scale=t_scale, mean_terms=cfg.local_loss)  # fmt: skip
    n_cls = recipe.cluster.num_classes if recipe.cluster is not None else None
    return Prepared(cfg, comm, device, student, teacher, model, recipe, opt, sched, stream, builder, step,
                    n_train, n_data, n_cls)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the loop


class _Pending:
    """The last step's terms, read back one step late: on a GPU the next step is queued before the host waits
    for this one's values (the only host sync of the loop, for the log and the NaN check)."""

    def __init__(self) -> None:
        self.item = None

    def put(self, step: int, values: dict[str, torch.Tensor], extra: dict) -> None:
        names = list(values)
        packed = torch.stack([values[k].float() for k in names]).detach()
        if packed.is_cuda:  # into pinned memory: a copy to pageable memory would wait for the device
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            stream = torch.cuda.current_stream(packed.device)  # the copy's stream, whatever the current device
            packed = host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
        else:
            event = None
        self.item = (step, names, packed, event, extra)

    def take(self):
        if self.item is None:
            return None
        step, names, packed, event, extra = self.item
        self.item = None
        if event is not None:
            event.synchronize()
        return step, dict(zip(names, packed.tolist())), extra


def run_train(cfg: TrainConfig) -> dict:
    comm = _comm(_local_device())
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, taken before the first write
            return _run(cfg, comm, held)
    finally:
        comm.close()


def _resume_point(cfg: TrainConfig, cfg_dict: dict, ckpt_dir: str, root: bool) -> dict | None:
    """The checkpoint a resume continues from (None for a fresh run), after every identity check."""
    out = cfg.out_dir
    if checkpoint.newest(ckpt_dir) is None:
        return None
    if not cfg.resume:
        raise ValueError(f"{out!r} already holds a run (checkpoints/): pass --resume, or another --out-dir")
    got = checkpoint.load_newest(ckpt_dir, say=print if root else lambda line: None)
    if got is None:
        return None
    resume, path = got
    moved, lines = run_folder.moved_inputs(resume["config"], resume.get("inputs"), cfg_dict)
    diff = checkpoint.config_difference(
        run_folder.comparable(resume["config"], moved=tuple(moved)),
        run_folder.comparable(cfg_dict, moved=tuple(moved)),
        ignore=(),
        defaults=run_folder.comparable(to_dict(TrainConfig())),
    )
    diff += run_folder.changed_inputs(resume.get("inputs"), cfg_dict)
    if diff:
        raise ValueError(f"--resume: the checkpoint in {out!r} was written with another config: {'; '.join(diff)}")
    threads = torch.get_num_threads()
    if root:
        for line in lines:
            print(line)
        if resume.get("threads", threads) != threads:
            print(f"warning: {path} was written by a run with {resume['threads']} CPU threads, this one has "
                  f"{threads}: it continues, but not bit for bit as the uninterrupted run would (CPU reductions "
                  "split by thread)")  # fmt: skip
    resume["path"] = path
    return resume


def _run(cfg: TrainConfig, comm: Comm, held: contextlib.ExitStack) -> dict:
    _check(cfg, comm.world)
    root = comm.rank == 0
    out = cfg.out_dir
    ckpt_dir = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.jsonl")
    cfg_dict = to_dict(cfg)
    resume = _resume_point(cfg, cfg_dict, ckpt_dir, root)
    ckpt_path = resume["path"] if resume is not None else None  # the newest good checkpoint
    if resume is not None:
        summary_path = os.path.join(out, "summary.json")
        if (
            resume["step"] >= cfg.steps
            and os.path.isfile(os.path.join(out, "student.pt"))
            and os.path.isfile(summary_path)
        ):  # a finished run: nothing to redo, nothing rewritten
            print(f"{out}: finished ({resume['step']} steps); nothing to resume")
            with open(summary_path) as f:
                return json.load(f)

    p = prepare(cfg, comm)
    model, student, teacher, opt, sched = p.model, p.student, p.teacher, p.optimizer, p.scheduler
    probe = evaluate.periodic_probe(cfg, student) if cfg.eval_every and root else None

    inputs = run_folder.input_fingerprints(cfg_dict) if root else None
    start, lines = 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        checkpoint.load_state(p.recipe, p.optimizer, resume["recipe"], resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        checkpoint.set_rng_state(resume["rng"])
        start, lines = resume["step"], list(resume["metrics"])
        if p.builder is None:  # streamed: the data position is in the checkpoint (refused on another split)
            p.stream.resume(resume.get("data"), start)
        if root:
            print(f"resumed {out} at step {start}")
    metrics = reporters = None
    if root:
        held.enter_context(run_folder.RunLock(out))
        clean_tmp(out, ckpt_dir)  # a kill during a write leaves only *.tmp-* files
        write_config(cfg, out)
        # the metrics file restarts from the checkpoint's lines: lines a killed run wrote after it are redone
        atomic_bytes(metrics_path, "".join(line + "\n" for line in lines).encode())
        metrics = open(metrics_path, "a", buffering=1)  # line-buffered: `tail -f` shows every step
        reporters = held.enter_context(
            contextlib.closing(reporting.Reporters(reporting.parse(cfg.report_to), out, cfg_dict, start))
        )
    pending = _Pending()

    def stop(message: str):
        if metrics is not None:
            metrics.close()
        kept = f"the last good checkpoint ({ckpt_path}) is kept" if ckpt_path else "no checkpoint was written"
        raise FloatingPointError(f"{message}; {kept}")

    def flush() -> None:
        """Log the pending step (every rank holds the same values: the NaN check agrees without a collective)."""
        got = pending.take()
        if got is None:
            return
        step, values, extra = got
        terms = {k: v for k, v in values.items() if k not in ("grad_norm", "logit_scale")}
        total = sum(terms.values())
        if not math.isfinite(total):
            stop(f"non-finite loss at step {step}: {terms}")
        if not math.isfinite(values["grad_norm"]):  # a finite loss can still have NaN gradients
            stop(f"non-finite gradient norm at step {step} (loss terms {terms})")
        record = {"step": step, "epoch": round(p.stream.epoch_of(step), 6), "loss": total, **terms,
                  "grad_norm": values["grad_norm"], "lr": extra["lr"],
                  "logit_scale": values["logit_scale"]}  # fmt: skip
        if probe is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            record.update(probe(model))
        line = json.dumps(record)
        lines.append(line)
        if metrics is not None:
            metrics.write(line + "\n")
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{total:.3f}", samples_s=f"{rate:.0f}")
            reporters.log(step, {**record, "samples_per_second": rate})

    def save(step: int) -> None:
        nonlocal ckpt_path
        flush()
        state = checkpoint.full_state(p.comm, p.recipe, p.optimizer)  # collective
        streamed = {"data": p.stream.state()} if p.builder is None else {}  # collective too
        if root:
            metrics.flush()
            rsd, osd = state
            ckpt_path = checkpoint.save(ckpt_dir, step, keep=cfg.keep_checkpoints, model=model.state_dict(),
                                        model_cfg=student.model_cfg, recipe=rsd, optimizer=osd,
                                        scheduler=sched.state_dict(), metrics=lines, config=cfg_dict,
                                        inputs=inputs, threads=torch.get_num_threads(), **streamed)  # fmt: skip

    def _one_step(step: int) -> None:
        nonlocal seen
        batch = p.batch(step)
        lr = opt.param_groups[0]["lr"]  # the step's learning rate (the schedule advances inside the step)
        values = p.step(batch)
        flush()  # the previous step's values: this one is already queued
        pending.put(step + 1, values, {"lr": lr})
        seen += batch["image"].shape[0] * comm.world
        bar.update(1)
        # on every rank (the probe runs on rank 0 only): a NaN found here stops all ranks at the same step
        needs_log = bool(cfg.eval_every) and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps)
        if needs_log:
            flush()
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps:
            save(step + 1)

    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.recipe}", disable=not (cfg.progress and root),
               unit="step")  # fmt: skip
    t0, seen = time.perf_counter(), 0
    with preempt.Preemption() as signals:
        for step in range(start, cfg.steps):
            _one_step(step)
            stop_by = signals.requested(comm)
            if stop_by and step + 1 < cfg.steps:  # preempted: checkpoint this step, say how to go on, exit
                if (step + 1) % cfg.ckpt_every:
                    save(step + 1)
                bar.close()
                if metrics is not None:
                    metrics.close()
                comm.barrier()
                if root:
                    print(f"stopped at step {step + 1} by {preempt.name(stop_by)}; resume with --resume "
                          f"(checkpoint {checkpoint.path_of(ckpt_dir, step + 1)})", flush=True)  # fmt: skip
                raise SystemExit(preempt.exit_code(stop_by))
    flush()
    bar.close()
    if metrics is not None:
        metrics.close()
    seconds = time.perf_counter() - t0

    final = os.path.join(out, "student.pt")
    last = json.loads(lines[-1]) if lines else {}
    summary = {
        "recipe": cfg.recipe,
        "steps": cfg.steps,
        "train_samples": p.train_samples,
        "dataset_samples": p.dataset_samples,
        "world_size": comm.world,
        "accum_freq": cfg.accum_freq,
        "final": last,
        "seconds_this_run": seconds,
        "samples_per_second_this_run": seen / seconds if seconds > 0 else None,
        "student": student.info,
        "teacher": teacher.info if teacher is not None else None,
        "data": to_dict(cfg.data),
    }
    if p.builder is None:  # streamed: what --skip-bad skipped, over every rank and the runs before a resume
        summary["skipped"] = p.stream.skipped(p.stream.state())  # collective
        p.stream.close()
        if root and any(summary["skipped"].values()):
            print(f"skipped {summary['skipped']['samples']} bad samples and {summary['skipped']['shards']} bad "
                  "shards (--skip-bad)")  # fmt: skip
    if root:
        atomic_torch(final, {"model": model.state_dict(), "model_cfg": student.model_cfg})
        atomic_json(os.path.join(out, "summary.json"), summary)
        print(f"{cfg.recipe}: {cfg.steps} steps on {p.train_samples} samples; student in {final}")
    comm.barrier()
    return summary
