"""``--report-to tensorboard,wandb``: the scalars of ``metrics.jsonl`` also sent to TensorBoard and Weights & Biases.

``metrics.jsonl`` stays the record (a resumed run rewrites it byte for byte); these are views of it for the tools
peer trainers use. Each logged step sends every number of its metrics line (loss terms, total loss, lr, grad norm,
logit scale, epoch, periodic zero-shot) plus ``samples_per_second``, which is wall-clock and so kept out of
``metrics.jsonl``.

* TensorBoard: event files in ``out_dir/tensorboard``. A resume opens the writer with ``purge_step`` = the resumed
  step, so the steps a killed run logged after its checkpoint are replaced, not shown twice.
* W&B: offline unless ``WANDB_MODE`` says otherwise (``wandb sync out_dir/wandb/offline-run-*`` uploads it); the run
  id is stored in ``out_dir/wandb_id`` so a resume continues the same W&B run.
"""

from __future__ import annotations

import os

KINDS = ("tensorboard", "wandb")


def parse(report_to: str) -> list[str]:
    """The reporters named in ``--report-to`` (comma-separated), checked: one ValueError line otherwise."""
    kinds = [k.strip() for k in report_to.split(",") if k.strip()]
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"--report-to must be a comma-separated subset of {', '.join(KINDS)}; got {report_to!r}")
        module = "tensorboard" if k == "tensorboard" else "wandb"
        try:
            __import__(module)
        except ImportError:
            raise ValueError(f"--report-to {k}: the {module} package is not installed (pip install {module})") from None
    return kinds


class Reporters:
    """The open reporters of a run (rank 0). ``log(step, record)`` sends a metrics record; ``close()`` flushes."""

    def __init__(self, kinds: list[str], out_dir: str, config: dict, start_step: int) -> None:
        self.tb = self.wandb_run = None
        if "tensorboard" in kinds:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"), purge_step=start_step or None)
        if "wandb" in kinds:
            import wandb

            id_path = os.path.join(out_dir, "wandb_id")
            if os.path.isfile(id_path):
                with open(id_path) as f:
                    run_id = f.read().strip()
            else:
                run_id = wandb.util.generate_id()
                with open(id_path, "w") as f:
                    f.write(run_id + "\n")
            self.wandb_run = wandb.init(project="clipcid_fast", dir=out_dir, id=run_id, resume="allow",
                                        config=config, mode=os.environ.get("WANDB_MODE", "offline"))  # fmt: skip

    def log(self, step: int, record: dict) -> None:
        scalars = {k: float(v) for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
