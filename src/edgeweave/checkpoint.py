"""Checkpoints: one .safetensors file holding the weights and, in its header, the JSON that
rebuilds the model (registry name, classes, input shape, kwargs, anything a workflow adds).

Why this format: safetensors cannot execute code on load (no pickle), the header is readable
without loading tensors, and the same bytes can be shipped to followers over the network.
Checkpoints are written tensor by tensor and loaded by mapping the file (``torch.UntypedStorage.
from_file``, private: writes to a loaded tensor never reach the file): a loaded model's weights
are pages of the file that the kernel reads when they are used and may drop again under memory
pressure, not a second copy in the process's own memory. A 1 GB board can then hold VGG16's
553 MB of weights beside the runtime, and a follower keeps resident only what its plans touch.

Structural changes (pruned channel counts) need no bookkeeping: after building the registered
architecture, every Conv2d / Linear / BatchNorm whose stored tensors have another shape is
replaced by one of the stored shape, so the file alone rebuilds the exact model.

A state dict also carries per-module versions (``state_dict._metadata``) that some loaders read:
MNASNet refuses a state dict without them (it would otherwise rebuild its first layers the
pre-v2 way). Tensors alone lose them, so the header keeps them (``versions``) and loading puts
them back.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import mmap
import os
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from edgeweave.errors import EdgeweaveError
from edgeweave.models import build_model

FORMAT_VERSION = 1
_META_KEY = "edgeweave"
_MAX_HEADER = 100 << 20  # bytes of JSON a checkpoint's header may have (safetensors' own bound)
_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}
_BY_NAME = {v: k for k, v in _DTYPES.items()}
_ALIGN = 64  # bytes: where every tensor of a checkpoint starts (a cache line; what oneDNN aligns to)
_PAD = "__edgeweave_pad__/"  # the names of the gaps between tensors (not the model's)


@dataclass
class ModelSpec:
    name: str
    num_classes: int = 10
    in_channels: int = 3
    input_size: tuple[int, int] = (224, 224)
    kwargs: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None

    def build(self) -> nn.Module:
        return build_model(self.name, num_classes=self.num_classes, in_channels=self.in_channels, **self.kwargs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(
            name=str(d["name"]),
            num_classes=int(d.get("num_classes", 10)),
            in_channels=int(d.get("in_channels", 3)),
            input_size=tuple(int(x) for x in d.get("input_size", (224, 224))),  # type: ignore[arg-type]
            kwargs=dict(d.get("kwargs", {})),
            classes=d.get("classes"),
        )


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share storage, and the file must not alias the model
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def tensors_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        if t.numel():  # the tensor's own bytes (a file mapping's pages), not a copy of them
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def model_hash(model: nn.Module) -> str:
    """sha256 of the weights (names, dtypes, shapes, bytes): followers compare it before computing."""
    return tensors_hash(model.state_dict())


def _versions(model: nn.Module) -> dict[str, int]:
    """Per-module state-dict versions (``state_dict()._metadata``), module path -> version."""
    meta = getattr(model.state_dict(), "_metadata", None) or {}
    return {str(k): int(v["version"]) for k, v in meta.items()
            if isinstance(v, dict) and isinstance(v.get("version"), int)}


def _meta(model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None, digest: str | None) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "spec": spec.to_dict(), "extra": extra or {},
            "hash": digest or model_hash(model), "versions": _versions(model)}


def write_checkpoint(f: BinaryIO, model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None,
                     digest: str | None = None) -> int:
    """Write ``model`` to ``f`` in the safetensors format, one tensor at a time (never a copy of
    the whole model in memory); returns the bytes written. Every tensor starts at a multiple of
    64 bytes of the file, so a mapped tensor is where the kernels want it (a weight that is not
    ran another code path of oneDNN and changed the last bits of some models' outputs).
    ``digest``: ``model_hash(model)`` where the caller has it (hashing VGG16 takes seconds on a board)."""
    state = model.state_dict()
    for k, t in state.items():
        if t.dtype not in _DTYPES:
            raise EdgeweaveError(f"cannot save {k!r}: dtype {t.dtype} is not supported in a checkpoint")
    header: dict[str, Any] = {"__metadata__": {_META_KEY: json.dumps(_meta(model, spec, extra, digest))}}
    layout: list[tuple[str, torch.Tensor | int]] = []  # what follows the header: tensors, and zero bytes
    at = 0
    for k in sorted(state):
        t = state[k]
        if at % _ALIGN:  # safetensors tiles its data: the gap is a tensor of its own, dropped on load
            gap = _ALIGN - at % _ALIGN
            header[f"{_PAD}{len(layout)}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [at, at + gap]}
            layout.append(("", gap))
            at += gap
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [at, at + n]}
        layout.append((k, t))
        at += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-(8 + len(head)) % _ALIGN)  # the data starts aligned (safetensors pads with spaces too)
    f.write(len(head).to_bytes(8, "little"))
    f.write(head)
    for _k, t in layout:
        if isinstance(t, int):
            f.write(bytes(t))
        elif t.numel():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return 8 + len(head) + at


def model_to_bytes(model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None) -> bytes:
    buf = io.BytesIO()
    write_checkpoint(buf, model, spec, extra)
    return buf.getvalue()


def _with_versions(tensors: dict[str, torch.Tensor], versions: Any) -> dict[str, torch.Tensor]:
    """``tensors`` as a state dict carrying the stored module versions (what ``load_state_dict``
    hands each module's ``_load_from_state_dict`` as its local metadata)."""
    sd: Any = OrderedDict(tensors)
    if isinstance(versions, dict) and versions:
        sd._metadata = OrderedDict((str(k), {"version": int(v)}) for k, v in versions.items()
                                   if isinstance(v, int) and not isinstance(v, bool))
    return sd


def _build(spec: ModelSpec, tensors: dict[str, torch.Tensor]) -> nn.Module:
    """The architecture, built on the meta device where the constructor allows (no random
    initialisation of weights about to be overwritten: VGG16 loads in a fraction of the time),
    for real where it does not (RegNet's constructor computes its widths with ``.tolist()``)."""
    try:
        with torch.device("meta"):
            model = spec.build()
            _resize_to(model, tensors)
        return model
    except EdgeweaveError:
        raise
    except Exception:  # noqa: BLE001 - any constructor that needs real tensors
        model = spec.build()
        _resize_to(model, tensors)
        return model


def _read_header(data: bytes, where: str) -> dict[str, Any]:
    if len(data) < 8:
        raise EdgeweaveError(f"{where}: not a checkpoint (too short)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise EdgeweaveError(f"{where}: not a safetensors checkpoint (bad header length)")
    return _parse_header(data[8 : 8 + n], where)[1]


def _parse_header(raw: bytes, where: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The safetensors header's JSON, and edgeweave's metadata in it."""
    try:
        header = json.loads(raw)
        meta = json.loads(header.get("__metadata__", {})[_META_KEY])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise EdgeweaveError(f"{where}: safetensors file without edgeweave metadata (was it saved by edgeweave?)") from None
    if meta.get("format") != FORMAT_VERSION:
        raise EdgeweaveError(f"{where}: checkpoint format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    return header, meta


def _resize_to(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace layers whose stored shapes differ (pruned models) with layers of the stored shape."""
    for mod_name, mod in list(model.named_modules()):
        prefix = f"{mod_name}." if mod_name else ""
        w = tensors.get(prefix + "weight")
        new: nn.Module | None = None
        if isinstance(mod, nn.Conv2d) and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            out_c, in_per_group = w.shape[0], w.shape[1]
            depthwise = mod.groups == mod.in_channels == mod.out_channels and mod.groups > 1
            groups = out_c if depthwise else mod.groups
            new = nn.Conv2d(in_per_group * groups, out_c, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                            groups, mod.bias is not None, mod.padding_mode)
        elif isinstance(mod, nn.Linear) and w is not None and tuple(w.shape) != tuple(mod.weight.shape):
            new = nn.Linear(w.shape[1], w.shape[0], mod.bias is not None)
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            rm = tensors.get(prefix + "running_mean", w)
            if rm is not None and rm.shape[0] != mod.num_features:
                new = type(mod)(rm.shape[0], mod.eps, mod.momentum, mod.affine, mod.track_running_stats)
        if new is not None:
            parent = model.get_submodule(mod_name.rpartition(".")[0]) if "." in mod_name else model
            setattr(parent, mod_name.rpartition(".")[2], new)


def model_from_bytes(data: bytes, where: str = "checkpoint") -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    meta = _read_header(data, where)
    try:
        tensors = {k: v for k, v in st_load(data).items() if not k.startswith(_PAD)}
    except SafetensorError as e:
        raise EdgeweaveError(f"{where}: corrupt checkpoint ({e})") from None
    return _assemble(meta, tensors, where)


def _assemble(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: str
              ) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """The model from a checkpoint's metadata and tensors, which it takes as they are (no copy)."""
    if tensors_hash(tensors) != meta.get("hash"):
        raise EdgeweaveError(f"{where}: weights do not match the hash recorded in the checkpoint (corrupt file?)")
    spec = ModelSpec.from_dict(meta["spec"])
    state = _with_versions(tensors, meta.get("versions"))
    # Build (on the meta device where possible), then take the stored tensors as they are.
    model = _build(spec, tensors)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise EdgeweaveError(f"{where}: weights do not fit architecture {spec.name!r}: {' '.join(first[:3])[:300]}") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # a non-persistent buffer is not in the file: build for real and copy the weights in
        model = spec.build()
        _resize_to(model, tensors)
        model.load_state_dict(state, strict=True)
    model.eval()
    return model, spec, dict(meta.get("extra", {}))


def _map_tensors(p: Path, where: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The checkpoint's metadata, and its tensors as views of a private mapping of the file."""
    with p.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise EdgeweaveError(f"{where}: not a safetensors checkpoint (bad header length)")
        header, meta = _parse_header(f.read(n), where)
        try:
            entries = [(k, _BY_NAME[v["dtype"]], [int(x) for x in v["shape"]], [int(x) for x in v["data_offsets"]])
                       for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EdgeweaveError(f"{where}: corrupt checkpoint (unreadable tensor table)") from None
        start, end = 8 + n, 0
        for k, dt, shape, (b, e) in sorted(entries, key=lambda x: x[3][0]):
            if b != end or e - b != math.prod(shape) * dt.itemsize or min(shape, default=0) < 0:
                raise EdgeweaveError(f"{where}: corrupt checkpoint (tensor {k!r} has bad offsets or size)")  # they tile the data
            end = e
        if start + end != size:
            raise EdgeweaveError(f"{where}: corrupt checkpoint ({size - start} bytes of data, the table says {end})")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: a write copies its page, never reaches the file
    tensors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": it is writable, copy-on-write
        for k, dt, shape, (b, e) in entries:
            width = dt.itemsize
            if k.startswith(_PAD):
                continue
            if e == b:
                tensors[k] = torch.empty(shape, dtype=dt)
            elif (start + b) % _ALIGN == 0:  # its own storage over its bytes of the mapping
                tensors[k] = torch.frombuffer(mapped, dtype=dt, count=(e - b) // width, offset=start + b).view(shape)
            else:  # not where kernels want it (a file of another writer, a small tensor): copied
                raw = torch.frombuffer(mapped, dtype=torch.uint8, count=e - b, offset=start + b)
                tensors[k] = raw.clone().view(dt).view(shape)
    return meta, tensors


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec, extra: dict[str, Any] | None = None) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("wb") as f:
        write_checkpoint(f, model, spec, extra)
    tmp.replace(p)  # atomic: a crash never leaves half a checkpoint behind
    return p


def load_checkpoint(path: str | Path, where: str | None = None) -> tuple[nn.Module, ModelSpec, dict[str, Any]]:
    """The model of a checkpoint file, its weights mapped from the file (module docstring).
    ``where``: how errors name the file (default: its path)."""
    p = Path(path)
    if not p.is_file():
        raise EdgeweaveError(f"checkpoint not found: {p}")
    meta, tensors = _map_tensors(p, where or str(p))
    return _assemble(meta, tensors, where or str(p))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON (spec, extra, hash) without building the model."""
    p = Path(path)
    if not p.is_file():
        raise EdgeweaveError(f"checkpoint not found: {p}")
    with p.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        return _read_header(head + f.read(n), str(p))


def scratch_dir() -> str | None:
    """Where model files in transit are written (a follower's received model, the leader's
    copy for shipping): the user's cache folder on disk, not a RAM-backed /tmp, since a loaded
    model's weights are pages of its file. None: the system's temporary folder."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "edgeweave", "models")
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        return path
    except OSError:
        return None


def is_checkpoint_path(name: str) -> bool:
    return name.endswith(".safetensors") or Path(name).is_file()


def load_model(name_or_path: str, num_classes: int = 10, in_channels: int = 3, input_size: int | tuple[int, int] = 224,
               **kwargs: Any) -> tuple[nn.Module, ModelSpec]:
    """A registry name builds a fresh model; a checkpoint path loads one (the CLI's ``--model M``)."""
    if is_checkpoint_path(name_or_path):
        model, spec, _ = load_checkpoint(name_or_path)
        return model, spec
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    spec = ModelSpec(name_or_path, num_classes, in_channels, size, dict(kwargs))  # type: ignore[arg-type]
    model = spec.build()
    model.eval()
    return model, spec
