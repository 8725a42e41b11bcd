"""Run every Triton kernel launch of the tests on one device, whatever device the tests build on.

The tests build their inputs on the CPU.  On a machine with a CUDA device the kernels are
compiled, and a compiled kernel cannot read CPU memory; so :class:`LaunchRouter` hooks the one
place every launch goes through, ``kernel[grid](*args)`` (``KernelInterface.__getitem__``, shared
by compiled and interpreted kernels): each tensor argument whose storage is not on the router's
device is copied there, storage and all (so views keep their strides and offsets, and arguments
that share memory keep sharing it), the kernel runs on those copies, and every copied storage is
copied back afterwards (kernels write their outputs, and K3 its gradient, in place).  Launchers,
PyTorch code and the tests themselves keep working on the CPU tensors.

Hooking the launch rather than a list of launcher functions is what makes it complete: a kernel
added later is routed without being named here.  ``tests/test_device_harness.py`` checks that on
CPU too: with ``clone=True`` the router copies into fresh CPU storage, and every launch of every
kernel path the tests exercise must receive only routed storage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from triton.runtime.jit import KernelInterface


@dataclass
class Launch:
    """One kernel launch as the router saw it."""

    kernel: str
    tensors: int                     # tensor arguments
    routed: int                      # of them, views into storage the router made on its device
    devices: set = field(default_factory=set)


class LaunchRouter:
    """Context manager (or ``install()`` / ``uninstall()``): every Triton launch runs on ``device``
    copies of its tensor arguments.  ``clone=True`` copies even storage already on ``device``
    (the CPU check of the routing itself).  ``launches`` records what each launch received."""

    def __init__(self, device, *, clone: bool = False):
        self.device = torch.device(device)
        self.clone = clone
        self.launches: List[Launch] = []
        self._saved = None

    # ------------------------------------------------------------------ install
    def install(self) -> "LaunchRouter":
        if self._saved is not None:
            raise RuntimeError("this LaunchRouter is installed already")
        saved = KernelInterface.__getitem__
        router = self

        def __getitem__(kernel, grid):
            return lambda *args, **kwargs: router.launch(kernel, saved(kernel, grid), args, kwargs)

        self._saved = saved
        KernelInterface.__getitem__ = __getitem__
        return self

    def uninstall(self) -> None:
        if self._saved is not None:
            KernelInterface.__getitem__ = self._saved
            self._saved = None

    def __enter__(self) -> "LaunchRouter":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ one launch
    def _needs_copy(self, x: torch.Tensor) -> bool:
        return self.clone or x.device != self.device

    def launch(self, kernel, run, args, kwargs):
        copies = {}                                    # host storage pointer -> (host bytes, device bytes)

        def moved(x):
            if not isinstance(x, torch.Tensor) or not self._needs_copy(x):
                return x
            storage = x.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if key not in copies:
                host = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
                copies[key] = (host, host.to(self.device, copy=True))
            dev_storage = copies[key][1].untyped_storage()
            return torch.empty(0, dtype=x.dtype, device=self.device).set_(
                dev_storage, x.storage_offset(), x.size(), x.stride())

        args2 = [moved(a) for a in args]
        kwargs2 = {k: moved(v) for k, v in kwargs.items()}
        routed_ptrs = {dev.untyped_storage().data_ptr() for _, dev in copies.values()}
        tensors = [t for t in list(args2) + list(kwargs2.values()) if isinstance(t, torch.Tensor)]
        self.launches.append(Launch(
            kernel=getattr(getattr(kernel, "fn", kernel), "__name__", repr(kernel)), tensors=len(tensors),
            routed=sum(t.untyped_storage().data_ptr() in routed_ptrs for t in tensors),
            devices={str(t.device) for t in tensors}))
        out = run(*args2, **kwargs2)
        if copies:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            with torch.no_grad():
                for host, dev in copies.values():
                    host.copy_(dev)
        return out
