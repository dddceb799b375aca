"""Streaming image semantic balance (SemDeDup / CLIP-CID union-find) and pseudo-class clustering.

CLIP-CID's first step drops semantically redundant images before distillation; the second clusters the
kept teacher embeddings into N pseudo-classes for the cluster-discrimination loss. Both run here on
embeddings that may be larger than RAM, in one process or under ``torchrun``.

Modules: ``sources`` (embedding files, ids, normalisation), ``functions`` (the fused op or the reference),
``kmeans`` (sampling, k-means, assignment), ``rules`` (the semdedup pass, union-find), ``outputs``
(manifest, resume, merge, plot), ``stages`` (``run_balance``), ``pseudo_classes`` (``run_cluster``),
``pipeline.comm.Comm`` (the gloo group under ``torchrun``); files are written through
``clipcid_fast.pipeline._io``.

Input
-----
* ``embeddings``: a ``.npy`` file ``[n, D]`` (float16 / float32 / float64), opened with
  ``np.load(mmap_mode="r")``, or a directory of such shards (``*.npy``, concatenated in file-name order;
  all shards must have the same D). Rows are used L2-normalised (cosine geometry), computed in float32.
* ``ids`` (optional): a ``.npy`` of n integers (or a directory of 1-D shards); default ``arange(n)``.

Rows with a NaN / inf or a zero norm are *invalid*. ``invalid="error"`` (default) raises a ValueError
naming the first such row; ``invalid="remove"`` removes them (never kept for any threshold, cluster −1,
listed in ``invalid_rows.npy``, counted as ``n_invalid``). Either way every input row is accounted for:
``kept + removed_duplicates + n_invalid == n_rows`` for every threshold.

Pipeline of ``run_balance`` (``stages``; each stage reads the embeddings once)
-------------------------------------------------------------------------------
1. **k-means** (rank 0; ``kmeans``): spherical k-means (faiss) on a sample of
   ``min(n, k · max_points_per_centroid)`` rows. ``centroids.npy`` float32 ``[k, D]``.
2. **assignment** (all ranks, row blocks round-robin; ``kmeans``): every row to its nearest centroid.
   ``assign.npy`` int64 ``[n]`` (−1 = invalid), ``assign_sim.npy`` float32 ``[n]`` (cosine to the
   assigned centroid; NaN = invalid).
3. **ordering** (rank 0; ``stages``): inside each cluster, SemDeDup's keep order ``keep`` = ``"hard"``
   (farthest from the centroid first, SemDeDup's default), ``"easy"`` (nearest first) or ``"random"``; ties
   go to the smaller row index. ``order.npy`` int64 (valid rows grouped by cluster, each cluster in that
   order) and ``offsets.npy`` int64 ``[k + 1]`` (cluster c is ``order[offsets[c]:offsets[c+1]]``).
4. **per-cluster rule** (all ranks, cluster ``c`` on rank ``c % world``, in batches of clusters; ``rules``):
   ``method="semdedup"`` removes row j for threshold eps when ``max_{i<j} cos(x_i, x_j) > 1 − eps`` over
   the ordered rows (every eps from one pass); ``method="unionfind"`` (CLIP-CID's variant) joins rows with
   ``‖x_i − x_j‖ < delta`` into groups and keeps the member nearest each group's mean.
5. **merge** (rank 0; ``outputs``) writes the outputs below.

Streaming and resume
--------------------
Every file is written to a temporary name and moved into place with ``os.replace`` (atomic). The
manifest (``manifest.json``) holds the run's fingerprint (input shapes / dtypes / sizes and the
parameters that change results); restarting in the same directory with different parameters is a
ValueError. Restarting the same run reuses ``centroids.npy``, finished assignment blocks
(``parts/assign_<start>_<stop>.npz``), ``assign.npy`` / ``order.npy`` and every finished cluster batch
(``batches/batch_c<first cluster>.npz``, listing its clusters); a run killed at any point therefore redoes
at most the one batch (per rank) that was in flight, and the final outputs are byte-identical to an
uninterrupted run, whatever ``batch_clusters`` or the number of ranks. The eps list is not part of the
fingerprint for ``semdedup`` (the batches store ``M``), so new thresholds only redo the merge.

Scale-out
---------
Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment, or an already initialised process group) the
ranks join a gloo group: k-means on rank 0, centroids broadcast, assignment blocks and clusters split
round-robin (cluster ``c`` on rank ``c % world``), rank 0 merges. Results equal one process's. The output
directory must be visible to every rank (one machine, or a shared file system).

Outputs of ``run_balance`` (directory ``out_dir``)
--------------------------------------------------
``keep_<t>.npy`` bool ``[n]`` per threshold (``t`` = ``eps0.05`` or ``delta0.3``), ``kept_ids_<t>.npy``
int64 (ids of kept rows, in row order), ``max_sim.npy`` float32 ``[n]`` (semdedup: ``M`` per row, −inf for
the first row of a cluster, NaN invalid) and ``nearest_earlier.npy`` int64 ``[n]`` (the row achieving ``M``,
−1 none), or ``rep_<t>.npy`` int64 ``[n]`` (unionfind: row of the group's representative, −1 invalid),
``clusters.csv`` (per cluster: size, mean cosine to centroid, kept per threshold), ``summary.json``
(counts, removed fraction per threshold, cluster size statistics; deterministic), ``balance.png``
(removed fraction vs threshold; cluster size histogram), ``timings.json`` (seconds and throughput per
stage; the only output that differs between runs), plus the intermediates above.

Pseudo-classes: ``run_cluster`` / ``clipcid-fast cluster``
---------------------------------------------------------
k-means of the kept embeddings (``keep`` = a bool ``[n]`` mask such as ``keep_eps0.05.npy``; default all
rows) into N pseudo-classes. Output directory, in the format the cluster-discrimination loss
(``reference.cluster_discrimination_loss(embeddings, centres, labels)``) loads:

* ``centroids.npy`` float32 ``[N, D]``, rows L2-normalised (the class centres);
* ``labels.npy`` int64 ``[n]``, aligned with the *input* rows: the nearest centre (max cosine) of each
  kept row, ``−1`` for rows not kept (or invalid), which is the loss's "no target" label;
* ``topk.npy`` int64 ``[n, k]`` and ``topk_sim.npy`` float32 ``[n, k]`` (only with ``topk=k``): the k
  nearest centres by decreasing cosine (``topk[:, 0] == labels``), rows of ``−1`` / NaN for rows not kept
  (MLCD-style multi-label targets);
* ``cluster.json``: N, D, counts, class size statistics, parameters.
"""

from .command import balance_command, cluster_command
from .functions import resolve_fns
from .kmeans import spherical_kmeans
from .outputs import find_keep_mask, keep_mask_path, load_keep_mask
from .pseudo_classes import load_pseudo_classes, load_pseudo_topk, pseudo_class_paths, run_cluster
from .rules import TIE_D2, group_representatives, unionfind_groups
from .sources import EmbeddingSource, normalize_rows
from .stages import KEEP_OPTIONS, METHODS, SMALL_CLUSTER_FLOPS, intra_op_threads, run_balance

__all__ = [
    "KEEP_OPTIONS",
    "METHODS",
    "SMALL_CLUSTER_FLOPS",
    "TIE_D2",
    "EmbeddingSource",
    "balance_command",
    "cluster_command",
    "find_keep_mask",
    "group_representatives",
    "intra_op_threads",
    "keep_mask_path",
    "load_keep_mask",
    "load_pseudo_classes",
    "load_pseudo_topk",
    "normalize_rows",
    "pseudo_class_paths",
    "resolve_fns",
    "run_balance",
    "run_cluster",
    "spherical_kmeans",
    "unionfind_groups",
]
