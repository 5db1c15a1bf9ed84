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

The directory is the run's own: it must be this user's, not a link, and
writable by no one else (`files.private_directory`), or nothing in it is
read or written. Its checkpoints are the entries named exactly `ckpt-` and
12 digits that are directories holding a manifest, ordered by that number;
anything else there (a `ModelCheckpoint`'s `ckpt-01.keras`, another tool's
folder) is never read, pruned or counted. Every number read back is checked
against what this code could have written (`validate`) before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import time
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
    "require_private",
    "save",
    "set_aside",
    "steps_to_skip",
    "validate",
]

LATEST = "latest"
MANIFEST = "manifest.json"
_PAYLOAD = ("arrays.npz", "meta.json")
_NAME = re.compile(r"ckpt-(\d{12})")
# The largest step a checkpoint's name can hold (12 digits).
MAX_STEP = 10**12 - 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with the file and the reason."""


def _refusal(directory: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f"refusing the checkpoint directory {directory} (TD_CHECKPOINT_DIR): it {reason}; a "
        "checkpoint planted there would be resumed by this run. Use a directory only you can "
        "write (chmod go-w, or another TD_CHECKPOINT_DIR)"
    )


def require_private(directory: str) -> None:
    """Creates `directory` unless it exists (OSError if it cannot be);
    raises CheckpointError unless it is this user's alone
    (`files.private_directory`)."""
    reason = files.private_directory(directory)
    if reason:
        raise _refusal(directory, reason)


def _require_existing_private(directory: str) -> bool:
    """Whether `directory` exists; raises CheckpointError if it is not this
    user's alone. Creates nothing (loading only looks)."""
    if not os.path.lexists(directory):
        return False
    reason = files.untrusted(directory, directory=True)
    if reason:
        raise _refusal(directory, reason)
    return True


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
    """Writes a checkpoint atomically and points `latest` at it; keeps it
    and the newest `keep - 1` others. Returns its path."""
    require_private(directory)
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
    # The one just written stays even when older-numbered than others (a run
    # resumed from an earlier checkpoint); only the plugin's own go.
    others = [n for n in _complete(directory) if n != name]
    for old in others[max(keep - 1, 0) :]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


def _complete(directory: str) -> list[str]:
    """The checkpoints this plugin renamed into place, newest (by number)
    first: `ckpt-` and 12 digits, a directory (not a link) with a manifest."""
    found = []
    for name in os.listdir(directory):
        match = _NAME.fullmatch(name)
        if match is None:
            continue
        try:
            entry = os.lstat(os.path.join(directory, name))
            manifest = os.lstat(os.path.join(directory, name, MANIFEST))
        except OSError:
            continue
        if stat.S_ISDIR(entry.st_mode) and stat.S_ISREG(manifest.st_mode):
            found.append((int(match.group(1)), name))
    return [name for _, name in sorted(found, reverse=True)]


def _candidates(directory: str) -> list[str]:
    """Checkpoints to try, best first: the one `latest` names, then the
    others, newest first."""
    if not directory or not _require_existing_private(directory):
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
        raise CheckpointError(
            f"{path} has no {MANIFEST} (not a complete checkpoint of this plugin)"
        ) from None
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
    from transparent_dist.core import collectives, log, world
    from transparent_dist.core.collectives import together

    w = world.get()
    skipped: list[str] = []
    with together(f"resuming from {directory}"):
        state = load_latest(directory, skipped) if w.is_root else None
        path = state[1]["path"] if state is not None else None
        if w.size > 1:
            path = collectives.broadcast_object(path, w.comm)
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
    if not 0 <= int(global_step) <= MAX_STEP:
        raise ValueError(f"global step {global_step} does not fit a checkpoint's name")
    return os.path.join(directory, f"ckpt-{int(global_step):012d}")


def set_aside(directory: str) -> str | None:
    """Moves this plugin's checkpoints in `directory`, and `latest`, into a
    new folder `superseded-<UTC time>-...` there (never deleting them);
    returns it, or None when there were none."""
    names = _complete(directory) if _require_existing_private(directory) else []
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = tempfile.mkdtemp(prefix=f"superseded-{stamp}-", dir=directory)
    for name in names:
        os.rename(os.path.join(directory, name), os.path.join(target, name))
    if os.path.lexists(os.path.join(directory, LATEST)):
        os.replace(os.path.join(directory, LATEST), os.path.join(target, LATEST))
    files.fsync_directory(directory)
    return target


# ------------------------------------------------------------ numbers read back

# Bounds no checkpoint of a real run comes near: a world of 16 million
# ranks, a million callbacks, a billion epochs.
_MAX_WORLD, _MAX_CALLBACKS, _MAX_EPOCH = 2**24, 10**6, 10**9


def _whole(file: str, key: str, value: Any, low: int, high: int, why: str = "") -> int:
    if type(value) is not int or not low <= value <= high:
        raise CheckpointError(
            f"{file}: {key}={value!r} is not a whole number from {low} to {high}{why}; "
            "this checkpoint was not written by this run (remove it, or set TD_RESUME=fresh)"
        )
    return value


def validate(meta: dict, arrays: int, limits: dict | None = None) -> None:
    """Raises CheckpointError, naming the file, unless every number in
    `meta` is one this plugin could have written for this run: whole
    numbers in range, the step its name says, no epoch past this fit's
    `limits["epochs"]`, no more samples consumed than `limits["samples"]`,
    callback state within the `arrays` the checkpoint holds."""
    limits = limits or {}
    file = os.path.join(meta["path"], "meta.json")
    epochs = limits.get("epochs")
    global_step = _whole(file, "global_step", meta.get("global_step"), 0, MAX_STEP)
    named = _NAME.fullmatch(os.path.basename(os.path.normpath(meta["path"])))
    if named is not None and int(named.group(1)) != global_step:
        raise CheckpointError(
            f"{file}: global_step={global_step}, but the checkpoint is named "
            f"{named.group(0)}; this checkpoint was not written by this run"
        )
    epoch_limit, why = (
        (epochs, f" (this fit has epochs={epochs})") if epochs is not None else (_MAX_EPOCH, "")
    )
    _whole(file, "epoch", meta.get("epoch"), 0, epoch_limit, why)
    step = _whole(file, "step", meta.get("step"), 0, MAX_STEP)
    if "world_size" in meta:
        _whole(file, "world_size", meta["world_size"], 1, _MAX_WORLD)
    if meta.get("unit") is not None:
        if meta["unit"] not in ("samples", "batches"):
            raise CheckpointError(f"{file}: unit={meta['unit']!r} is neither samples nor batches")
        per_step = _whole(file, "per_step", meta.get("per_step"), 1, MAX_STEP)
        samples = limits.get("samples") if meta["unit"] == "samples" else None
        high, why = (
            (samples, f" (this fit's data has {samples} samples)")
            if samples is not None
            else (step * per_step, "")
        )
        consumed = _whole(file, "consumed", meta.get("consumed"), 0, high, why)
        if consumed != step * per_step:
            raise CheckpointError(
                f"{file}: consumed={consumed} is not step x per_step ({step} x {per_step})"
            )
    state_arrays = meta.get("state_arrays", arrays)
    _whole(file, "state_arrays", state_arrays, 0, arrays)
    if "metric_arrays" in meta:
        _whole(file, "metric_arrays", meta["metric_arrays"], 0, arrays - state_arrays)
    if not isinstance(meta.get("stopped", False), bool):
        raise CheckpointError(f"{file}: stopped={meta['stopped']!r} is not true or false")
    _validate_callbacks(file, meta.get("callbacks", {}), arrays, epoch_limit, why)
    history = meta.get("history")
    if history is not None and not isinstance(history, dict):
        raise CheckpointError(f"{file}: history is not a mapping")
    _validate_numbers(file, "history", history, False, epoch_limit, why)
    unsaved = meta.get("unsaved", [])
    if not (isinstance(unsaved, list) and all(isinstance(u, str) for u in unsaved)):
        raise CheckpointError(f"{file}: unsaved is not a list of callback names")


def _validate_callbacks(file: str, saved: Any, arrays: int, epochs: int, why: str) -> None:
    """The callbacks' saved state: per callback index, its class and
    attributes; every whole number in it in range, every epoch within
    this fit's, every array range within the checkpoint's arrays."""
    if not isinstance(saved, dict):
        raise CheckpointError(f"{file}: callbacks is not a mapping")
    for index, entry in saved.items():
        where = f"callbacks[{index}]"
        if not (isinstance(index, str) and index.isdigit() and int(index) < _MAX_CALLBACKS):
            raise CheckpointError(f"{file}: {where} is not a callback's position")
        if not isinstance(entry, dict) or not isinstance(entry.get("class"), str):
            raise CheckpointError(f"{file}: {where} names no callback class")
        for key, value in entry.items():
            if key == "arrays":
                if not (
                    isinstance(value, dict) and all(isinstance(v, list) for v in value.values())
                ):
                    raise CheckpointError(f"{file}: {where}.arrays is not a mapping of ranges")
                for name, span in value.items():
                    if len(span) != 2:
                        raise CheckpointError(
                            f"{file}: {where}.arrays.{name} is not [start, count]"
                        )
                    start = _whole(file, f"{where}.arrays.{name}[0]", span[0], 0, arrays)
                    _whole(file, f"{where}.arrays.{name}[1]", span[1], 0, arrays - start)
            else:
                _validate_numbers(file, f"{where}.{key}", value, "epoch" in key, epochs, why)


def _validate_numbers(
    file: str, where: str, value: Any, epoch: bool, epochs: int, why: str
) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, (float, str)):
        return
    if isinstance(value, int):
        high = epochs if epoch else MAX_STEP
        _whole(file, where, value, -1, high, why if epoch else "")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _validate_numbers(file, f"{where}[{i}]", item, epoch, epochs, why)
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = epoch or "epoch" in str(key)
            _validate_numbers(file, f"{where}.{key}", item, inner, epochs, why)
    else:
        raise CheckpointError(f"{file}: {where} holds a {type(value).__name__}")


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
    """Proves the checkpoint directory this user's alone (CheckpointError
    otherwise) and writable the way `save` writes: create, fsync, rename,
    delete. Raises OSError naming it otherwise."""
    try:
        require_private(directory)
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
