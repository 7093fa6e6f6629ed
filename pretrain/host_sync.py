"""Finding host synchronisations in a training step, on any device, CPU included.

On a GPU every value the host reads back (``.item()``, ``bool(t)``, ``.cpu()``, ``.tolist()``) and every op
whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``)
stalls the launch queue until the GPU catches up. ``HostSyncGuard`` catches them where they are asked for,
which is the same on every device: a ``TorchFunctionMode`` sees the Python-level reads (``Tensor.item``,
``__bool__``, ``tolist``, ``cpu``, ``numpy``) and a ``TorchDispatchMode`` sees the aten ops underneath,
including those reached from C++ (boolean indexing decomposes into ``nonzero``, a tensor's truth value into
``_local_scalar_dense``)::

    with HostSyncGuard():                       # raises HostSyncError at the first sync
        losses = task(batch); losses["loss"].backward()
    with HostSyncGuard(record=True) as guard:   # or lists them: guard.seen
        ...

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports the syncs the driver sees (``benchmarks/
step_profile.py`` prints both counts).
"""

from __future__ import annotations

import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten ops that read device data back to the host or size their output by the data.
SYNCING_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.nonzero_static.default,
               aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
               aten.unique_consecutive.default, aten.repeat_interleave.Tensor, aten.equal.default,
               aten.is_nonzero.default}
# Python-level reads of a tensor's values.
SYNCING_METHODS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
                   torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__}


class HostSyncError(AssertionError):
    pass


class _Functions(TorchFunctionMode):
    def __init__(self, guard: HostSyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_METHODS:
            self.guard.found(f"Tensor.{func.__name__}")
        if func is torch.Tensor.to and _to_host(args, kwargs or {}):
            self.guard.found("Tensor.to('cpu') of a device tensor")
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    device = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
    return device is not None and torch.device(device).type == "cpu" and args[0].device.type != "cpu"


class _Dispatch(TorchDispatchMode):
    def __init__(self, guard: HostSyncGuard):
        super().__init__()
        self.guard = guard

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            self.guard.found(f"aten.{func.__name__}")
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = args[1]
            if any(index is not None and index.dtype == torch.bool for index in indices):
                self.guard.found(f"boolean-mask indexing (aten.{func.__name__})")
        return func(*args, **(kwargs or {}))


class HostSyncGuard:
    """``with HostSyncGuard(): step()`` raises ``HostSyncError`` at the first host synchronisation.

    ``record=True`` lists them in ``seen`` instead of raising. ``allowed`` maps a function name to how many
    syncs it may make inside the guard (the caller's frames are searched for it), for a sync kept on purpose;
    ``allowed_seen`` counts those that happened."""

    def __init__(self, allowed: dict[str, int] | None = None, record: bool = False):
        self.allowed = dict(allowed or {})
        self.allowed_seen = dict.fromkeys(self.allowed, 0)
        self.record = record
        self.seen: list[str] = []

    def found(self, what: str) -> None:
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_code.co_name
            if name in self.allowed and self.allowed_seen[name] < self.allowed[name]:
                self.allowed_seen[name] += 1
                return
            frame = frame.f_back
        if self.record:
            self.seen.append(what)
            return
        raise HostSyncError(f"host sync in the step: {what}")

    def __enter__(self):
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False
