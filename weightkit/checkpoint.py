"""Checkpoints that load whole or not at all.

``save_checkpoint(path, model=..., optimizer=..., extra=...)`` writes one file: the serialized state plus its
SHA-256, written to a temporary file and renamed into place, so an interrupted save leaves the previous checkpoint
intact. ``load_checkpoint(path, model=..., optimizer=...)`` verifies the checksum, checks that every tensor of the
model's state matches the checkpoint in name, shape and dtype, and only then loads; if loading the optimizer fails
after the model was loaded, the model's previous state is restored. A truncated, corrupted or mismatched file raises
:class:`CheckpointError` naming what is wrong; nothing is half-loaded.

Int8Linear weights, scales, INT4 projectors and optimizer RNG state are ordinary entries of the module and
optimizer state dicts, so they round-trip exactly.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import zipfile
import zlib
from typing import Any, Dict, Optional

import torch
from torch import nn

FORMAT = "weightkit-checkpoint"
VERSION = 1


class CheckpointError(RuntimeError):
    """The checkpoint cannot be loaded (corrupt, truncated, or does not match the model/optimizer)."""


def _serialize(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _cuda_rng_state():
    """The CUDA generators' states (CPU byte tensors), when this process uses CUDA; None otherwise (reading them
    would initialise CUDA in a CPU-only run)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.get_rng_state_all()
    return None


def save_checkpoint(path: str, model: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    extra: Optional[Dict[str, Any]] = None) -> str:
    """Write model/optimizer state (and ``extra``, e.g. the step) atomically to ``path``; returns the SHA-256."""
    payload = {
        "model": model.state_dict() if model is not None else None,
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra or {},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": _cuda_rng_state(),
    }
    body = _serialize(payload)
    digest = hashlib.sha256(body).hexdigest()
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, "sha256": digest, "body": body}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return digest


def read_checkpoint(path: str, map_location="cpu") -> Dict[str, Any]:
    """The verified payload of a checkpoint file (dict with model, optimizer, extra, torch_rng, cuda_rng). Tensors
    are loaded to ``map_location`` (the CPU by default): ``load_checkpoint`` then copies them into the model's
    tensors and the optimizer moves its state to each parameter's device, so a checkpoint written on one device
    loads on another."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is a directory, not a checkpoint file")
    try:
        outer = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to parse the container means a damaged file
        raise CheckpointError(f"checkpoint {path!r} {container_damage(path)}") from exc
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a weightkit checkpoint (no '{FORMAT}' header)")
    if outer.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path!r} has format version {outer.get('version')}, expected {VERSION}")
    body = outer.get("body")
    if not isinstance(body, (bytes, bytearray)) or hashlib.sha256(body).hexdigest() != outer.get("sha256"):
        raise CheckpointError(f"checkpoint {path!r} failed its SHA-256 check: the file is corrupt")
    try:
        return torch.load(io.BytesIO(body), map_location=map_location, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        # the bytes are the ones that were saved (the checksum holds): they were written by software that this one
        # cannot read back (another weightkit or torch version pickling a class that is gone or has moved)
        raise CheckpointError(f"checkpoint {path!r} is intact (its SHA-256 matches) but its contents cannot be "
                              "read by this weightkit and torch: it was probably saved by another version "
                              f"(reading it failed with {type(exc).__name__})") from exc


def container_damage(path: str) -> str:
    """What is wrong with a file that ``torch.load`` refused, in words (the end of a sentence starting with the
    file's name). A torch.save file is a zip archive: its first bytes are a zip signature, its directory is at the
    end of the file (missing when the file was cut short), and every record carries a CRC-32 (a changed byte fails
    it)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "is empty (0 bytes): the save never wrote it, or it was cut to nothing"
    if head != b"PK\x03\x04":
        return (f"is not a checkpoint: its {size} bytes do not start like a file written by torch.save (a zip "
                "archive) or weightkit.save_checkpoint")
    try:
        with zipfile.ZipFile(path) as archive:
            bad_record = archive.testzip()
    except zipfile.BadZipFile:
        return (f"is truncated: the end of the file (the archive's directory) is missing, only {size} bytes are "
                "there; the save or a copy of it was cut short")
    except (OSError, EOFError, zlib.error, RuntimeError, ValueError):
        bad_record = "?"
    if bad_record is not None:
        return ("is corrupt: bytes inside it changed after it was written (a stored record fails its CRC-32 "
                "check); the disk or a copy damaged it")
    return ("is corrupt: it is a complete torch.save archive, but not one that holds a weightkit checkpoint's "
            "header and body")


def _check_model_state(model: nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    current = model.state_dict()
    missing = sorted(set(current) - set(state))
    unexpected = sorted(set(state) - set(current))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path!r} does not match the model: missing keys {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                              f"{'...' if len(unexpected) > 5 else ''}")
    for key, tensor in current.items():
        saved = state[key]
        if not isinstance(saved, torch.Tensor):
            raise CheckpointError(f"checkpoint {path!r}: {key} is {type(saved).__name__}, expected a tensor")
        if saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise CheckpointError(f"checkpoint {path!r}: {key} has shape {tuple(saved.shape)} dtype {saved.dtype}, "
                                  f"the model has shape {tuple(tensor.shape)} dtype {tensor.dtype}")


def load_checkpoint(path: str, model: Optional[nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None,
                    restore_rng: bool = False) -> Dict[str, Any]:
    """Verify and load a checkpoint into ``model`` and ``optimizer``; returns its ``extra`` dict. ``restore_rng``
    also restores torch's CPU generator and, when the checkpoint holds them (saved by a process that used CUDA)
    and this machine has as many GPUs, the CUDA generators."""
    payload = read_checkpoint(path)
    if model is not None:
        if payload.get("model") is None:
            raise CheckpointError(f"checkpoint {path!r} holds no model state")
        _check_model_state(model, payload["model"], path)
    if optimizer is not None and payload.get("optimizer") is None:
        raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()} if model is not None else None
    optimizer_backup = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
    try:
        if model is not None:
            model.load_state_dict(payload["model"], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(payload["optimizer"])
    except Exception as exc:
        if model is not None:
            model.load_state_dict(backup, strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_backup)
        raise CheckpointError(f"checkpoint {path!r} could not be loaded ({type(exc).__name__}: {exc}); "
                              "the model and optimizer were left as they were") from exc
    if restore_rng:
        torch.set_rng_state(payload["torch_rng"])
        cuda_rng = payload.get("cuda_rng")  # absent in checkpoints of earlier versions, None from CPU-only runs
        if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_rng)
    return payload.get("extra", {})


def safetensors_damage(path: str) -> str:
    """What is wrong with a ``.safetensors`` file that safetensors refused to load, in words (the end of a sentence
    starting with the file's name). The format: 8 bytes giving the header's length N (little-endian), N bytes of
    JSON header naming each tensor's dtype, shape and byte range, then the tensors' bytes."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
            header_bytes = f.read(header_len) if header_len is not None and header_len <= size - 8 else None
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "is empty (0 bytes): the save or download never wrote it"
    if header_len is None:
        return f"is truncated: {size} bytes, fewer than the 8 that give the header's length"
    if header_bytes is None:
        return (f"is truncated or not a safetensors file: it announces a {header_len}-byte header but has only "
                f"{size - 8} bytes after the length")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
        ends = [int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"]
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "is corrupt: its header (the tensors' names, dtypes and offsets) is not valid safetensors JSON"
    needed = 8 + header_len + max(ends, default=0)
    if needed > size:
        return (f"is truncated: its header describes {needed} bytes of tensors and header, the file has only {size}; "
                "the save or download was cut short")
    return ("is corrupt: its header and size agree, but safetensors rejects a tensor's entry (dtype, shape or "
            "byte range)")
