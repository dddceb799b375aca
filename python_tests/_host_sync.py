"""What makes the host wait for the device: the ops the hot-path tests watch for (``test_no_host_sync.py`` raises
on them, ``test_train_parallel.py`` records them during a training step)."""

import torch

aten = torch.ops.aten

_SYNC_OPS = {
    aten._local_scalar_dense: "reads a value on the host (.item(), float(t), int(t))",
    aten.is_nonzero: "bool(tensor) reads a value on the host",
    aten.item: "reads a value on the host",
    aten.equal: "torch.equal returns a host bool",
    aten.nonzero: "output shape depends on values (nonzero)",
    aten.masked_select: "output shape depends on values",
    aten.argwhere: "output shape depends on values",
    aten._unique: "output shape depends on values",
    aten._unique2: "output shape depends on values",
    aten.unique_dim: "output shape depends on values",
    aten.unique_consecutive: "output shape depends on values",
    aten.unique_dim_consecutive: "output shape depends on values",
    aten.bincount: "output shape depends on values",
}
_INDEX_OPS = (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_)


def why_it_syncs(func, args, kwargs) -> str | None:
    """Why this dispatched op syncs the host with the device (a value read, a value-dependent shape, a copy
    between devices), or None."""
    packet = func.overloadpacket
    if packet in _SYNC_OPS:
        return _SYNC_OPS[packet]
    if packet in _INDEX_OPS:
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
            return "boolean-mask indexing: the output shape depends on values (a nonzero inside)"
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size: the output shape depends on values"
    if packet in (aten._to_copy, aten.copy_):
        src = args[0] if packet is aten._to_copy else args[1]
        dst = kwargs.get("device") if packet is aten._to_copy else args[0].device
        if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst) != src.device:
            return f"a copy between devices ({src.device} -> {dst})"
    return None
