"""The native CPU kernels: built at first use, cached on disk, called through ctypes.

One library from two sources: native.c, the decode kernels this module calls (below), and grouped.c,
the many-token kernels of the grouped path (called by grouped.py).

Decode (T <= 16 tokens) on CPU is bound by reading weights, and the torch path pays a fixed cost per
call on top (a host-side plan, a zeroed buffer, one torch call per run of groups, the gate multiply).
`native.c` does a whole op in one C call: every weight of a `read_multi`, or a write with its bias,
gates and residual, with fp32 accumulation over fp32 or bf16 weights, threads over output chunks
(OpenMP, torch's thread count). codegen/README.md has the measurements behind it.

Build: `cc -O3 -march=native -fopenmp -ffp-contract=off -shared` (about a second: plain C, no torch
headers), once per machine, into `$MOHDIFY_CACHE` (default `~/.cache/mohdify`) under a key of the
sources, the flags, the compiler and the CPU; later processes load the cached library. Where no C
compiler exists or the build fails, `library()` warns once and returns None, and the kernels run the
torch path (same numbers up to fp32 summation order). `MOHDIFY_NATIVE=0` turns it off without a
warning.

Which calls it takes (`read` / `write` return None otherwise and the caller runs the torch path):
fp32 or bf16, all tensors of one dtype, reader weights column-major (strides (1, >= O), the layout
mohdify gives CPU readers), writer weights row-major, no writer fusion matrix. `calls` counts the
calls it ran, per op kind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from .plan import DECODE_MAX_TOKENS

__all__ = ["library", "read", "write", "calls", "reset", "DTYPES", "MAX_TOKENS"]

SOURCE = Path(__file__).with_name("native.c")
# one library: decode, many-token (grouped.py), many-token routing (routing.py)
SOURCES = (SOURCE, Path(__file__).with_name("grouped.c"), Path(__file__).with_name("routing.c"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fPIC", "-shared", "-std=c11"]
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
MAX_WEIGHTS = 16                      # weights one read call takes (native.c)
MAX_TOKENS = DECODE_MAX_TOKENS        # tokens of the calls it takes (decode; more go the torch path)
calls: Counter = Counter()            # "read" / "write": calls the native kernels ran

_lock = threading.Lock()
_state: dict = {}                     # "lib": CDLL or None once tried; "why": the reason it is None
LOADED = False                        # the library is loaded (a plain bool: torch.compile's tracing reads it)


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU model and flags (a cache shared by machines stays valid)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("MOHDIFY_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or
                                                           os.path.expanduser("~/.cache"), "mohdify")
    return Path(root)


def _build(cc: str) -> Path:
    """The cached library's path, compiling it first if it is not there; raises on failure."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([*(src.read_text() for src in SOURCES), " ".join(FLAGS), version,
                                  _cpu_key()]).encode())
    target = _cache_dir() / f"mohd_native_{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{cc} exited with {done.returncode}: {done.stderr.strip()[-800:]}")
        os.replace(out, target)                                               # atomic: concurrent builds agree
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    p, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64
    lib.mohd_read.argtypes = [i32, i32, i32, p, p, i32, i32, p, p, i32, i32]
    lib.mohd_read.restype = i32
    lib.mohd_write.argtypes = [i32, i64, i64, i32, p, i32, p, i64, p, p, i32, p, p, i32]
    lib.mohd_write.restype = i32
    for name in ("mohd_gs_acc", "mohd_gs_wgrad"):        # grouped.c (grouped.py)
        getattr(lib, name).argtypes = [i64, p, p, p, p, i64, p, i64, p, i64, i64, i64, i32]
        getattr(lib, name).restype = i32
    lib.mohd_gs_dot.argtypes = [i64, p, p, p, p, i64, p, i64, p, p, i64, i64, i64, i32]
    lib.mohd_gs_dot.restype = i32
    lib.mohd_gs_plan.argtypes = [i64, i64, p, i64, p, p, p, p]
    lib.mohd_gs_plan.restype = i64
    lib.mohd_route_gates.argtypes = [i64, i64, i64, i64, p, p, p, p, p, p, p]   # routing.c (routing.py)
    lib.mohd_route_gates.restype = i32
    lib.mohd_route_gates_bw.argtypes = [i64, i64, i64, i64, p, p, p, p, p, p]
    lib.mohd_route_gates_bw.restype = i32
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The native library, built or loaded on the first call; None (one warning) where it cannot be."""
    if "lib" in _state:
        return _state["lib"]
    with _lock:
        if "lib" in _state:
            return _state["lib"]
        lib, why = None, None
        if os.environ.get("MOHDIFY_NATIVE", "1") == "0":
            why = "MOHDIFY_NATIVE=0"
        elif (cc := _compiler()) is None:
            why = "no C compiler found (cc, gcc, clang or $CC)"
        else:
            try:
                lib = _load(_build(cc))
            except (OSError, RuntimeError, subprocess.SubprocessError) as err:
                why = f"building {' + '.join(src.name for src in SOURCES)} failed: {err}"
        if lib is None and why != "MOHDIFY_NATIVE=0":
            warnings.warn(f"mohdify: the native CPU kernels (decode, and many tokens) are not available ({why}); the "
                          "MoHD ops run their torch path on CPU (same results up to fp32 summation order, slower "
                          "decode and training). MOHDIFY_NATIVE=0 silences this.",
                          RuntimeWarning, stacklevel=2)
        _state.update(lib=lib, why=why)
        global LOADED
        LOADED = lib is not None
        return lib


def reset() -> None:
    """Forget the loaded library (tests: simulate a machine without a compiler, then come back)."""
    global LOADED
    with _lock:
        _state.clear()
        LOADED = False


def _lib() -> Optional[ctypes.CDLL]:
    return _state["lib"] if "lib" in _state else library()


def read(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
         alpha: Optional[Tensor]) -> Optional[list[Tensor]]:
    """`[read(x, W_i, b_i, mask, alpha)]` in one native call, or None when it does not take the call.

    It checks what the C kernel relies on itself, in one pass (the decode hot path: no other check
    runs before it); on None the caller runs the full input checks (codegen/contracts.py), which name what is
    wrong, and the torch path. x `[T, D]` with 0 < T <= MAX_TOKENS, W_i `[O_i, D]` column-major."""
    dt = DTYPES.get(x.dtype)
    if dt is None or x.dim() != 2 or mask.dim() != 2 or mask.dtype != torch.bool or len(weights) > MAX_WEIGHTS \
            or len(weights) != len(biases) or (lib := _lib()) is None:
        return None
    tokens, width = x.shape
    groups = mask.shape[1]
    if not 0 < tokens <= MAX_TOKENS or mask.shape[0] != tokens or groups == 0 or width % groups or not weights:
        return None
    if alpha is not None and (alpha.dtype not in DTYPES or alpha.shape != (tokens,) or not alpha.is_contiguous()):
        return None
    meta, outs = [], []
    for w, b in zip(weights, biases):
        if w.dtype != x.dtype or w.dim() != 2:
            return None
        out_features, in_features = w.shape
        rows, cols = w.stride()                                               # column-major: (1, >= O)
        if in_features != width or (rows != 1 and out_features != 1) or cols < out_features:
            return None
        if b is not None and (b.dtype != x.dtype or b.shape != (out_features,) or not b.is_contiguous()):
            return None
        out = torch.empty(tokens, out_features, dtype=x.dtype)                # [T, O_i]
        outs.append(out)
        meta += (w.data_ptr(), cols, out_features, 0 if b is None else b.data_ptr(), out.data_ptr())
    x, mask = x.contiguous(), mask.contiguous()
    status = lib.mohd_read(tokens, width, groups, mask.data_ptr(), x.data_ptr(), dt, len(weights),
                           (ctypes.c_int64 * len(meta))(*meta), None if alpha is None else alpha.data_ptr(),
                           0 if alpha is None else DTYPES[alpha.dtype], torch.get_num_threads())
    if status != 0:
        raise MemoryError("mohdify::read (native CPU kernel): out of memory for its fp32 buffers")
    calls["read"] += 1
    return outs


def write(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor],
          residual: Optional[Tensor]) -> Optional[Tensor]:
    """`write(u, W, b, gates)` (+ residual) in one native call, or None when it does not take the call
    (checks as `read`: the caller checks the inputs fully on None). u `[T, I]` with 0 < T <= MAX_TOKENS,
    W `[D, I]` row-major, gates `[T, N]`, residual `[T, D]`."""
    dt = DTYPES.get(u.dtype)
    if dt is None or fusion is not None or weight.dtype != u.dtype or u.dim() != 2 or weight.dim() != 2 \
            or gates.dim() != 2 or gates.dtype not in DTYPES or (lib := _lib()) is None:
        return None
    tokens, in_features = u.shape
    out_features, weight_in = weight.shape
    groups = gates.shape[1]
    rows, cols = weight.stride()                                              # row-major: (>= I, 1)
    if not 0 < tokens <= MAX_TOKENS or weight_in != in_features or gates.shape[0] != tokens or groups == 0 \
            or out_features % groups or (cols != 1 and in_features != 1) or rows < in_features:
        return None
    if bias is not None and (bias.dtype != u.dtype or bias.shape != (out_features,) or not bias.is_contiguous()):
        return None
    if residual is not None:
        if residual.dtype != u.dtype or residual.shape != (tokens, out_features):
            return None
        residual = residual.contiguous()
    u, gates = u.contiguous(), gates.contiguous()
    out = torch.empty(tokens, out_features, dtype=u.dtype)                    # [T, D]
    status = lib.mohd_write(tokens, in_features, out_features, groups, u.data_ptr(), dt, weight.data_ptr(), rows,
                            None if bias is None else bias.data_ptr(), gates.data_ptr(), DTYPES[gates.dtype],
                            None if residual is None else residual.data_ptr(), out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("mohdify::write (native CPU kernel): out of memory for its fp32 buffers")
    calls["write"] += 1
    return out
