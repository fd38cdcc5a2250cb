"""What fastar's modules share: the op namespace the public functions call, the registry of fake (meta)
implementations, input checks (devices, autograd, integral scalars, index tensors, overlap, relations, q_scale),
the dtypes the kernels take, the default softmax scale and the Philox stream arguments. Every helper used by
more than one module lives here, once."""
from __future__ import annotations

import contextlib
import operator
from typing import Callable, Dict, Optional, Tuple, Union

import torch

INT32_MAX = 2**31 - 1
# A device argument: a torch.device, a name such as "cuda:0", or None (the CPU, or a default the caller says).
Device = Union[torch.device, str, None]
# The input dtypes of the attention kernels.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Which blocks (masks.BlockCausal) or scales (ScaleLayout) a query's own block or scale sees: "causal" itself and
# the earlier ones, "same" itself only, "prev" itself and the one before.
RELATIONS = ("causal", "same", "prev")

# The namespace whose ops the public functions call: a module global (not a ContextVar) so that torch.compile
# traces its read and guards on it.
_ops = torch.ops.fastar


def ops():
    """The op namespace the public functions call, read at each call: torch.ops.fastar, unless a test has
    pointed it elsewhere with :func:`using_ops`."""
    return _ops


@contextlib.contextmanager
def using_ops(namespace):
    """Within the block the public functions call the ops of ``namespace`` (the tests pass torch.ops.fastar_simt,
    the SIMT build, or an object whose attributes stand in for ops)."""
    global _ops
    previous, _ops = _ops, namespace
    try:
        yield
    finally:
        _ops = previous


_fakes: Dict[str, Callable] = {}


def fake(name: str):
    """Decorator: the function is the fake (meta) implementation of op ``name`` (output shapes and dtypes for
    torch.compile, FakeTensor and opcheck); :func:`register_fakes` registers it."""

    def record(fn: Callable) -> Callable:
        _fakes[name] = fn
        return fn

    return record


def register_fakes(namespace: str) -> None:
    """Register every recorded fake for the ops of ``torch.ops.<namespace>`` (fastar, or fastar_simt in tests)."""
    for name, fn in _fakes.items():
        torch.library.register_fake(f"{namespace}::{name}")(fn)


def one_device(op: str, *tensors) -> None:
    """For a fake: the inputs a kernel reads must share a device (a meta tensor among CPU ones would otherwise
    dispatch to the fake and return uninitialised CPU memory)."""
    devices = {t.device for t in tensors if isinstance(t, torch.Tensor)}
    torch._check(len(devices) <= 1,
                 lambda: f"fastar.{op}: all inputs must be on one device, got {sorted(map(str, devices))}")


def attention_lse(q: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """For the fake of an attention op: its LSE ``[B, H, L]``; the op writes ``out`` in place, so this only
    checks it."""
    torch._check(q.dim() == 4, lambda: "q must be 4-D [B, H, L, D]")
    torch._check(out.shape == q.shape and out.dtype == q.dtype, lambda: "out must have the shape and dtype of q")
    batch, heads, length, _ = q.shape
    return q.new_empty((batch, heads, length), dtype=torch.float32)


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


def four_d(op: str, layout: str, **tensors) -> None:
    """TypeError unless every given value is a tensor, ValueError unless it is 4-D (``layout`` names its
    dimensions in the message, e.g. ``[B, H, L, D]``)."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(t.shape)}")


def head_dim(op: str, D: int) -> None:
    """Raise ValueError for a head dim of 0 (the default softmax scale is ``1/sqrt(D)``)."""
    if D == 0:
        raise ValueError(f"{op}: the head dim D must be at least 1, got 0")


def softmax_scale(scale, D: int, qk_norm: bool = False) -> float:
    """The softmax scale an op runs with: ``scale`` as given, else 1 with ``qk_norm`` (VAR's attn_l2_norm),
    else ``1/sqrt(D)`` (PyTorch's SDPA default)."""
    if scale is not None:
        return float(scale)
    return 1.0 if qk_norm else D**-0.5


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


def as_int(value, what: str, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """An integral scalar (a Python or numpy integer, anything with ``__index__``; not a bool) as an int in
    ``[low, high]`` (either bound optional): TypeError for anything else, ValueError out of range. ``what``
    names the argument in the messages."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got a bool")
    try:
        n = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None
    if (low is not None and n < low) or (high is not None and n > high):
        raise ValueError(f"{what} must lie in [{'-inf' if low is None else low}, {'inf' if high is None else high}], "
                         f"got {n}")
    return n


def integral(op: str, value, name: str):
    """An integral scalar as a Python int (see :func:`as_int`) or an int64 tensor (integer tensors, no host
    read); TypeError for bools, floats and anything else."""
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.dtype.is_floating_point or value.dtype.is_complex:
            raise TypeError(f"{op}: {name} must hold an integer, got a {value.dtype} tensor")
        return value.to(torch.int64)
    return as_int(value, f"{op}: {name}")


def _scalar_tensor(op: str, value, name: str) -> torch.Tensor:
    """An int64 scalar tensor from an integral scalar (a Python or numpy integer, taken modulo 2**64) or an
    integer tensor of one element."""
    value = integral(op, value, name)
    if isinstance(value, torch.Tensor):
        return value
    value %= 1 << 64
    if value >= 1 << 63:
        value -= 1 << 64
    return torch.tensor(value, dtype=torch.int64)


def philox_args(op: str, seed, offset, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (seed, offset) int64 scalar tensors of a Philox-sampling op; seed=None draws a seed. Tensors must be
    on the CPU or on ``device``, the inputs' device."""
    if seed is None:
        # Consume torch's default generator of the device, so torch.manual_seed makes runs repeatable.
        seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    seed_t, offset_t = _scalar_tensor(op, seed, "seed"), _scalar_tensor(op, offset, "offset")
    for name, t in (("seed", seed_t), ("offset", offset_t)):
        if t.device.type != "cpu" and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device}; it must be on the CPU or on {device}, the inputs' device")
    return seed_t, offset_t


def check_relation(value) -> str:
    """``value`` if it is one of :data:`RELATIONS`, else ValueError."""
    if not isinstance(value, str) or value not in RELATIONS:
        raise ValueError(f"unknown relation {value!r}: expected one of {sorted(RELATIONS)}")
    return value


def q_scale_arg(op: str, q: torch.Tensor, q_scale, qk_norm: bool) -> Optional[torch.Tensor]:
    """VAR's per-head factors of the normalised queries as the scale_attention op takes them: float32 ``[Hq]``
    on q's device, or None. ValueError without ``qk_norm`` or for a wrong shape or device, TypeError unless a
    float tensor."""
    if q_scale is None:
        return None
    if not qk_norm:
        raise ValueError(f"{op}: q_scale applies only with qk_norm=True")
    if not isinstance(q_scale, torch.Tensor) or not q_scale.dtype.is_floating_point:
        raise TypeError(f"{op}: q_scale must be a float tensor [Hq], got "
                        f"{q_scale.dtype if isinstance(q_scale, torch.Tensor) else type(q_scale).__name__}")
    Hq = q.shape[1]
    if q_scale.shape != (Hq,):
        raise ValueError(f"{op}: q_scale must have shape [Hq={Hq}], got {tuple(q_scale.shape)}")
    if q_scale.device != q.device:
        raise ValueError(f"{op}: q_scale is on {q_scale.device}, q on {q.device}")
    return q_scale.to(torch.float32)


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
