"""A local checkpoint's safetensors files, read and checked before any loader trusts them.

    names = checkpoint_tensors(Path("models/zephyr"))   # {tensor name: (dtype, shape)}
    start, header = read_header(Path("models/zephyr/model.safetensors"))

Every file is checked against its own header: a file too short for the header it announces (a
truncated download), a header that is not JSON, a header length past the file's end, a tensor
whose bytes lie past the end or do not fill its shape, a shard named by the index that is not
there. Each is one `WmdpError` naming the file. Torch-free (the loaders above it use torch).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from wmdp.errors import WmdpError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
MAX_HEADER = 100_000_000  # bytes; the safetensors library refuses larger headers too

# bytes per element of safetensors' dtypes (F4 and packed types have no whole byte: not checked)
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
            "F8_E8M0": 1, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2,
            "U8": 1, "BOOL": 1}


def one_line(e: BaseException) -> str:
    """A library's exception as one line of at most 300 characters (its first line)."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def read_header(path: Path) -> tuple[int, dict]:
    """(where the data starts, the header) of a safetensors file, every tensor entry checked
    against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise WmdpError(f"{path}: not a safetensors file ({size} bytes, no header)")
        n = int.from_bytes(raw, "little")
        if n > size - 8 or n > MAX_HEADER:
            raise WmdpError(f"{path}: not a safetensors file, or truncated: its header length "
                            f"{n} is past the file's end ({size} bytes)")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise WmdpError(f"{path}: not a safetensors file: its header is not JSON") from None
    if not isinstance(header, dict):
        raise WmdpError(f"{path}: not a safetensors file: its header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__":
            _check_entry(path, name, info, data)
    return 8 + n, header


def _check_entry(path: Path, name: str, info: object, data: int) -> None:
    ok = (isinstance(info, dict) and isinstance(info.get("dtype"), str)
          and isinstance(info.get("shape"), list) and isinstance(info.get("data_offsets"), list)
          and all(_count(d) for d in info["shape"]) and len(info["data_offsets"]) == 2
          and all(_count(o) for o in info["data_offsets"]))
    if not ok:
        raise WmdpError(f"{path}: tensor {name}: malformed header entry (expected dtype, shape "
                        "and two data_offsets)")
    b, e = info["data_offsets"]
    if e > data:
        raise WmdpError(f"{path}: truncated: tensor {name} ends at byte {e} of the data, which "
                        f"holds {data} bytes")
    itemsize = ITEMSIZE.get(info["dtype"])
    if itemsize is not None and e - b != math.prod(info["shape"]) * itemsize:
        raise WmdpError(f"{path}: tensor {name}: {e - b} bytes for a {info['dtype']} tensor of "
                        f"shape {info['shape']}")


def _count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def weight_map(source: Path) -> dict[str, str]:
    """Tensor name -> shard file name, from the index or the single file's header."""
    if (source / INDEX).is_file():
        where = source / INDEX
        try:
            index = json.loads(where.read_text(encoding="utf-8"))
        except (ValueError, RecursionError):
            raise WmdpError(f"{where}: not a JSON index") from None
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise WmdpError(f'{where}: expected a "weight_map" of tensor names to file names')
        for shard in set(wmap.values()):
            if Path(shard).name != shard or not (source / shard).is_file():
                raise WmdpError(f"{where}: shard {shard!r} is not a file in {source}")
        return dict(wmap)
    if (source / SINGLE).is_file():
        return {k: SINGLE for k in read_header(source / SINGLE)[1] if k != "__metadata__"}
    raise WmdpError(f"{source}: no {SINGLE} or {INDEX}")


def checkpoint_tensors(source: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor of the checkpoint in directory `source`: name -> (dtype, shape), each shard
    checked; a name the index places in a shard that lacks it is an error."""
    wmap = weight_map(source)
    out: dict[str, tuple[str, list[int]]] = {}
    for shard in sorted(set(wmap.values())):
        header = read_header(source / shard)[1]
        out.update({k: (v["dtype"], v["shape"]) for k, v in header.items()
                    if k != "__metadata__"})
    absent = sorted(k for k in wmap if k not in out)
    if absent:
        raise WmdpError(f"{source / INDEX}: tensor {absent[0]} is not in its shard "
                        f"{wmap[absent[0]]} ({len(absent)} such)")
    return out
