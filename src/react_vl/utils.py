"""Small helpers every stage shares: atomic writes, JSON summaries, Markdown tables, device and
precision choice.

torch is imported where it is used, so the world generator and the CLI start without it.
"""

import contextlib
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
