"""Checkpoints that a kill mid-write cannot corrupt, verified before use
(when they are written: `preemption`).

```python
import numpy as np
from transparent_dist.core import checkpoint
checkpoint.save("/tmp/ckpt", [np.zeros(3)], {"epoch": 1, "step": 0, "global_step": 10})
arrays, meta = checkpoint.load_latest("/tmp/ckpt")
```

A checkpoint is a directory `ckpt-<global step>` holding `arrays.npz`,
`meta.json` and, written last, `manifest.json` (the size and SHA-256 of the
other two). It is written in a private temporary directory (`mkdtemp`, so
nothing planted under its name is followed), flushed to disk, and only then
renamed into place; the file `latest` names the newest one and is itself
replaced by rename. A write that fails removes its temporary directory.

Loading never runs anything from the file (arrays without pickle, metadata as
JSON) and checks the manifest first. A checkpoint that fails the check
(truncated, garbage, half-copied) is skipped, saying which file and why, and
the newest one that passes is used instead (the older ones are kept for
this, `TD_CHECKPOINT_KEEP`). Rank 0 decides; every rank loads what it chose.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from transparent_dist.core import files

__all__ = [
    "CheckpointError",
    "LATEST",
    "MANIFEST",
    "load",
    "load_agreed",
    "load_latest",
    "path_for",
    "peek",
    "probe",
    "progress",
    "save",
    "steps_to_skip",
]

LATEST = "latest"
MANIFEST = "manifest.json"
_PAYLOAD = ("arrays.npz", "meta.json")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


def _file_digest(path: str) -> tuple[int, str]:
    """(size, SHA-256) of a file, read in chunks (checkpoints can be large)."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _write_payload(directory: str, arrays: list[np.ndarray], meta: dict) -> None:
    with files.created(os.path.join(directory, "arrays.npz")) as f:
        np.savez(f, *arrays)
    files.write_atomically(os.path.join(directory, "meta.json"), json.dumps(meta).encode())
    manifest = {}
    for name in _PAYLOAD:
        size, digest = _file_digest(os.path.join(directory, name))
        manifest[name] = {"size": size, "sha256": digest}
    files.write_atomically(os.path.join(directory, MANIFEST), json.dumps(manifest).encode())


def save(directory: str, arrays: list[np.ndarray], meta: dict, keep: int = 3) -> str:
    """Writes a checkpoint atomically and points `latest` at it; keeps the
    newest `keep`. Returns its path."""
    os.makedirs(directory, exist_ok=True)
    final = path_for(directory, meta["global_step"])
    name = os.path.basename(final)
    temporary = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=directory)
    try:
        os.chmod(temporary, 0o755)
        _write_payload(temporary, arrays, meta)
        if os.path.lexists(final):
            shutil.rmtree(final)
        os.rename(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    files.write_atomically(os.path.join(directory, LATEST), (name + "\n").encode())
    files.fsync_directory(directory)
    from transparent_dist.core import log

    log.debug(f"checkpoint written: {final}")
    for old in _complete(directory)[keep:]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


def _complete(directory: str) -> list[str]:
    """The checkpoints renamed into place, newest first."""
    return sorted((n for n in os.listdir(directory) if n.startswith("ckpt-")), reverse=True)


def _candidates(directory: str) -> list[str]:
    """Checkpoints to try, best first: the one `latest` names, then the
    others, newest first."""
    if not directory or not os.path.isdir(directory):
        return []
    names = _complete(directory)
    try:
        with open(os.path.join(directory, LATEST)) as f:
            named = f.read().strip()
        if named in names:
            names.remove(named)
            names.insert(0, named)
    except OSError:
        pass  # written last: the newest renamed one is complete
    return [os.path.join(directory, n) for n in names]


def _verify(path: str) -> None:
    """Checks the files of the checkpoint at `path` against its manifest."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        return  # written before manifests existed: the zip's CRCs still check
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path}: {MANIFEST} is unreadable ({error})") from None
    for name in _PAYLOAD:
        file = os.path.join(path, name)
        expected = manifest.get(name, {}) if isinstance(manifest, dict) else {}
        try:
            size, digest = _file_digest(file)
        except OSError as error:
            raise CheckpointError(f"{file} cannot be read ({error.strerror})") from None
        if size != expected.get("size"):
            raise CheckpointError(
                f"{file} holds {size} bytes, not the {expected.get('size')} written "
                "(truncated or replaced)"
            )
        if digest != expected.get("sha256"):
            raise CheckpointError(f"{file} does not match the SHA-256 in its manifest")


def load(path: str) -> tuple[list[np.ndarray], dict]:
    """`(arrays, meta)` of the checkpoint at `path`, verified; raises
    CheckpointError naming the file otherwise."""
    _verify(path)
    file = os.path.join(path, "arrays.npz")
    try:
        with np.load(file, allow_pickle=False) as data:
            arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    except Exception as error:  # noqa: BLE001 - any decoding failure names the file
        raise CheckpointError(
            f"{file} is not a readable array file ({type(error).__name__}: {error})"
        ) from None
    return arrays, _read_meta(path)


def _read_meta(path: str) -> dict:
    file = os.path.join(path, "meta.json")
    try:
        with open(file, "rb") as f:
            meta = json.loads(f.read())
        if not isinstance(meta, dict) or "global_step" not in meta:
            raise ValueError("no global_step")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{file} is not checkpoint metadata ({error})") from None
    meta["path"] = path
    return meta


def load_latest(
    directory: str, skipped: list[str] | None = None
) -> tuple[list[np.ndarray], dict] | None:
    """`(arrays, meta)` of the newest checkpoint that passes the checks, or
    None; the reasons for those skipped are appended to `skipped`."""
    for path in _candidates(directory):
        try:
            return load(path)
        except CheckpointError as error:
            if skipped is not None:
                skipped.append(str(error))
    return None


def load_agreed(directory: str) -> tuple[list[np.ndarray], dict] | None:
    """`load_latest` decided by rank 0 and loaded by every rank: all ranks
    resume from the same checkpoint. Says which were skipped and why."""
    from transparent_dist.core import log, world
    from transparent_dist.core.errors import together

    w = world.get()
    skipped: list[str] = []
    with together(f"resuming from {directory}"):
        state = load_latest(directory, skipped) if w.is_root else None
        path = state[1]["path"] if state is not None else None
        if w.size > 1:
            path = w.comm.bcast(path, root=0)
            if not w.is_root and path is not None:
                state = load(path)
    for reason in skipped:
        log.info(f"skipped a checkpoint that failed its check: {reason}", once=False)
    if skipped and state is None:
        log.info(f"no valid checkpoint in {directory}: training starts afresh", once=False)
    return state


def peek(directory: str) -> dict | None:
    """The metadata of the newest checkpoint that passes its manifest
    check, or None (its arrays are checksummed, not decoded)."""
    for path in _candidates(directory):
        try:
            _verify(path)
            return _read_meta(path)
        except CheckpointError:
            continue
    return None


def path_for(directory: str, global_step: int) -> str:
    """Where the checkpoint of `global_step` is (or will be) written."""
    return os.path.join(directory, f"ckpt-{int(global_step):012d}")


def progress(step: int, unit: tuple[str, int] | None, world_size: int) -> dict:
    """What a checkpoint records of where the epoch stood: the world size,
    what one step consumes (`unit`: ("samples", global batch) or
    ("batches", ranks)) and how much of the epoch was consumed."""
    record: dict[str, Any] = {"world_size": world_size}
    if unit is not None:
        record.update(unit=unit[0], per_step=unit[1], consumed=step * unit[1])
    return record


def steps_to_skip(meta: dict, unit: tuple[str, int] | None, world_size: int) -> int:
    """How many of this job's steps the resumed epoch skips. The checkpoint
    says how much of the epoch was consumed; this job's steps may consume
    another amount (another rank count or global batch). Never skips what
    was not done: a remainder that is not a whole step is done again, and
    said so (once, by rank 0)."""
    from transparent_dist.core import log

    step = int(meta["step"])
    same = meta.get("world_size", world_size) == world_size and (
        unit is None or (meta.get("unit"), meta.get("per_step")) == unit
    )
    if same:
        return step
    if unit is None or meta.get("unit") != unit[0] or "consumed" not in meta:
        log.info(
            f"resuming the checkpoint of {meta.get('world_size', '?')} ranks on "
            f"{world_size}: this data's progress cannot be counted in samples, so the "
            f"resumed epoch skips {step} steps of this job, which may skip or repeat some "
            "of its data",
            once=False,
        )
        return step
    consumed, per_step, what = int(meta["consumed"]), unit[1], unit[0]
    skip = consumed // per_step
    repeated = consumed - skip * per_step
    exact = (
        "exactly where it stopped"
        if not repeated
        else f"{repeated} {what} before where it stopped (they are trained on again)"
    )
    log.info(
        f"resuming a checkpoint of {meta['world_size']} ranks ({meta['per_step']} {what} per "
        f"step, {consumed} done in epoch {meta['epoch'] + 1}) on {world_size} ranks "
        f"({per_step} per step): the epoch resumes after step {skip}, {exact}",
        once=False,
    )
    return skip


def probe(directory: str) -> None:
    """Proves the checkpoint directory writable the way `save` writes:
    create, fsync, rename, delete. Raises OSError naming it otherwise."""
    try:
        os.makedirs(directory, exist_ok=True)
        target = os.path.join(directory, f".probe-{os.getpid()}")
        files.write_atomically(target, b"transparent_dist write probe\n")
        os.unlink(target)
        files.fsync_directory(directory)
    except OSError as error:
        raise OSError(
            error.errno,
            f"the checkpoint directory {directory} (TD_CHECKPOINT_DIR) cannot be written: "
            f"{error.strerror}; fix it before training, or the checkpoint at the walltime "
            "would be lost",
        ) from None
