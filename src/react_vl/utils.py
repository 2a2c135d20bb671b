"""Small helpers every stage shares: atomic writes, JSON summaries, Markdown tables, device and
precision choice.

torch is imported where it is used, so the world generator and the CLI start without it.
"""

import contextlib
import ctypes
import ctypes.util
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    A crash mid-write leaves the previous file (or none), never a truncated one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes files private; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_save(obj, path: str | os.PathLike) -> Path:
    """torch.save, atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def write_json(obj, path: str | os.PathLike) -> Path:
    """Write a JSON file atomically (indented, keys in insertion order)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    return Path(path)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """The lines of a Markdown table: a float cell with 4 decimals, any other cell as str()."""
    def line(cells):
        return "| " + " | ".join(f"{c:.4f}" if isinstance(c, float) else str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def read_json(path: str | os.PathLike):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expected a JSON file at {path}")
    return json.loads(path.read_text())


def _json_default(obj):
    if hasattr(obj, "tolist"):  # numpy / torch scalars and arrays
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# glibc mallopt parameters, and the size up to which freed blocks stay in the process for reuse
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEEP_FREED_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Have glibc keep freed blocks up to KEEP_FREED_BYTES for reuse instead of unmapping them.

    A training or embedding step frees and allocates the same large tensors every step
    (activations, the token embedding's dense gradient). glibc maps blocks above its threshold
    (at most 32 MiB) fresh from the system each time, and every page of a fresh block faults
    and is zeroed on first touch. Keeping them is what the jemalloc / tcmalloc that PyTorch's
    CPU performance guide recommends do. A process's memory then stays at its peak, which a
    training process reaches every step anyway. Returns whether the setting was made: not off
    glibc, and not when the environment sets glibc's own MALLOC_MMAP_THRESHOLD_ /
    MALLOC_TRIM_THRESHOLD_ (a benchmark measuring memory does).
    """
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator is left alone
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_BYTES) and mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def resolve_device(device: str | None = None) -> "torch.device":
    """'auto' / None -> cuda if available, else cpu."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: "torch.device") -> "torch.dtype | None":
    """The autocast dtype of a --precision (auto, fp32, bf16, fp16) on `device`. auto: bf16 on GPUs
    that support it (fp16 on older ones) and on CPUs with native bf16 instructions; fp32 on other
    CPUs, where emulated bf16 is slower than fp32. fp32 turns autocast off."""
    import torch

    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_native_bf16() else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: stay with fp32
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
