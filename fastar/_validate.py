"""Input checks shared by the public wrappers: devices, autograd, integral scalars, index tensors, overlap."""
from __future__ import annotations

import operator
from typing import Optional

import torch

INT32_MAX = 2**31 - 1


def check(ok: torch.Tensor, error: type, message: str, sync: bool = False) -> None:
    """Raise ``error(message)`` unless the bool scalar tensor ``ok`` is True.

    ``ok`` on the CPU is always checked; on a device only with ``sync`` (a host sync: for one-time checks,
    such as building a mask, not for every call). Under torch.compile the check of a CPU tensor is an
    assertion of the graph (a RuntimeError with the same message) and a device tensor is not checked."""
    if ok.device.type != "cpu" and (not sync or torch.compiler.is_compiling()):
        return
    if torch.compiler.is_compiling():
        torch._assert_async(ok, f"{error.__name__}: {message}")
    elif not bool(ok):
        raise error(message)


def same_device(op: str, device: torch.device, **tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError unless every given tensor is on ``device`` (the device of the op's main input); values
    that are not tensors are left to the op's own checks.

    The dispatcher picks the meta (fake) kernel when any input is a meta tensor, so a meta tensor among CPU
    tensors would return uninitialised CPU memory: mixed devices are refused before the op is called."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}, but the other inputs are on {device}")


def head_dim(op: str, D: int) -> None:
    """Raise ValueError for a head dim of 0 (the default softmax scale is ``1/sqrt(D)``)."""
    if D == 0:
        raise ValueError(f"{op}: the head dim D must be at least 1, got 0")


def no_grad(op: str, **tensors: Optional[torch.Tensor]) -> None:
    """Raise ValueError if grad mode is on and an input requires grad: the kernels compute no gradients, so
    autograd would see an output that silently gives no gradient to its inputs."""
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.requires_grad:
            raise ValueError(
                f"{op}: {name} requires grad, but fastar's kernels compute no gradients; call it under "
                "torch.no_grad() or torch.inference_mode(), or pass detached tensors"
            )


def integral(op: str, value, name: str):
    """An integral scalar as a Python int (Python and numpy integers) or an int64 tensor (integer tensors,
    no host read); TypeError for bools, floats and anything else."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{op}: {name} must hold an integer, got a {value.dtype} tensor")
        return value.to(torch.int64)
    if isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be an integer, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an integer, got {type(value).__name__}") from None


def index_tensor(op: str, value, name: str, device: torch.device) -> torch.Tensor:
    """An integer tensor of indices or lengths, as given (not narrowed): it must hold integers (not bools or
    floats, which would be truncated); nested lists become a tensor on ``device``."""
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value, device=device)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise TypeError(f"{op}: {name} must be integers, got {type(value).__name__}") from None
    if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
        raise TypeError(f"{op}: {name} must hold integers, got {value.dtype}")
    return value


def narrow_int32(t: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """int32 ``t``; a device tensor (whose values :func:`check` does not read) is clamped to ``[low, high]``
    first, so a value past int32 cannot wrap around to a valid-looking index."""
    if t.device.type != "cpu":
        t = t.clamp(low, high)
    return t.to(torch.int32)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (an expanded, stride-0 or as_strided view): False
    only when the dimensions, ordered by stride, each step past the whole extent of the smaller ones."""
    extent = 1
    for stride, size in sorted((abs(st), s) for s, st in zip(t.shape, t.stride()) if s > 1):
        if stride < extent:
            return True
        extent = stride * size
    return False
