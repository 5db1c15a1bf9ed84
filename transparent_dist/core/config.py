"""Settings of the plugin: `TD_*` environment variables and `configure()`.

```python
import transparent_dist
transparent_dist.configure(batch_size="global", lr_scaling="linear")
```

Every setting has an environment variable (read once, when the package is
imported) and a keyword of `configure()` (which wins, and may be called at
any point before the `fit` it should affect). The README has the table.
"""

from __future__ import annotations

import dataclasses
import os

__all__ = ["SETTINGS", "Settings", "configure", "from_environment", "parse_every"]

_CHOICES = {
    "compression": ("none", "fp16", "bf16"),
    "batch_size": ("per_rank", "global"),
    "lr_scaling": ("none", "linear"),
    "stdout": ("root", "all"),
    "mpi": ("auto", "on", "off"),
    "native": ("auto", "on", "off"),
}


@dataclasses.dataclass
class Settings:
    """The plugin's settings; one instance lives in `SETTINGS`."""

    # `batch_size` passed to fit/evaluate/predict is per rank (global batch is
    # N * batch_size) or the global batch.
    batch_size: str = "per_rank"
    # Opt-in linear learning-rate scaling by N with gradual warm-up.
    lr_scaling: str = "none"
    warmup_epochs: float = 5.0
    # Whether ranks other than 0 may write to standard output.
    stdout: str = "root"
    # Whether to start MPI: "auto" starts it only under a launcher.
    mpi: str = "auto"
    # Seconds a collective may wait for missing ranks before they are named
    # (0: never), and before the job is ended (0: never). A job of more than
    # one rank always runs under a launcher or batch system, where a hang
    # burns the allocation: it ends after 10 minutes unless told otherwise.
    stall_warn: float = 60.0
    stall_abort: float = 600.0
    # Checkpoint-and-exit on SIGTERM / SIGUSR1, automatic resume, periodic
    # checkpoints ("500": steps, "600s": seconds), and how many to keep.
    checkpoint_dir: str = ""
    checkpoint_every: str = ""
    checkpoint_keep: int = 3
    # Gradient exchange: largest fused buffer (MB) before splitting into
    # buckets, optional 16-bit compression, and a Chrome-trace timeline.
    fusion_mb: float = 64.0
    compression: str = "none"
    timeline: str = ""
    # The compiled exchange op ("auto": used when it builds, else the numpy
    # exchange with a warning; "on": required; "off": never).
    native: str = "auto"
    # More messages from the plugin (on every rank).
    verbose: bool = False
    # The whole plugin off: plain Keras / TensorFlow.
    disable: bool = False


def _validate(key: str, value: object) -> object:
    choices = _CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ValueError(f"transparent_dist: {key}={value!r} is not one of {', '.join(choices)}")
    if key in ("warmup_epochs", "stall_warn", "stall_abort", "fusion_mb"):
        try:
            value = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"transparent_dist: {key} must be a number, not {value!r}") from None
        if value < 0:
            raise ValueError(f"transparent_dist: {key} must be >= 0")
    if key == "checkpoint_keep":
        value = int(value)  # type: ignore[arg-type]
        if value < 1:
            raise ValueError("transparent_dist: checkpoint_keep must be >= 1")
    if key == "checkpoint_every":
        parse_every(str(value))
    return value


def parse_every(value: str) -> tuple[int, float]:
    """`TD_CHECKPOINT_EVERY`: "500" (steps) or "600s" (seconds) -> (steps, seconds)."""
    value = (value or "").strip().lower()
    if not value or value == "0":
        return 0, 0.0
    try:
        if value.endswith("s"):
            return 0, float(value[:-1])
        return int(value), 0.0
    except ValueError:
        raise ValueError(
            f"transparent_dist: TD_CHECKPOINT_EVERY={value!r} is neither steps (500) "
            "nor seconds (600s)"
        ) from None


def from_environment(environ: os._Environ | dict | None = None) -> Settings:
    """Reads the `TD_*` variables into a new `Settings`."""
    env = os.environ if environ is None else environ
    settings = Settings()
    for field in dataclasses.fields(Settings):
        name = "TD_" + field.name.upper()
        if field.type == "bool":
            setattr(settings, field.name, _env_bool(env, name, field.default))
        elif name in env and env[name] != "":
            value = env[name].strip()
            if field.name in _CHOICES:
                value = value.lower()
            setattr(settings, field.name, _validate(field.name, value))
    return settings


def _env_bool(env, name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() not in ("0", "false", "no", "off")


SETTINGS = from_environment()


def configure(**kwargs: object) -> Settings:
    """Changes settings at run time; returns the settings in force.

    ```python
    transparent_dist.configure(batch_size="global")
    ```
    """
    names = {f.name for f in dataclasses.fields(Settings)}
    for key, value in kwargs.items():
        if key not in names:
            raise TypeError(
                f"transparent_dist.configure() got an unknown setting {key!r}; "
                f"known: {', '.join(sorted(names))}"
            )
        setattr(SETTINGS, key, _validate(key, value))
    return SETTINGS
