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
import difflib
import os

__all__ = [
    "ERRORS",
    "PER_RANK",
    "SETTINGS",
    "Settings",
    "configure",
    "from_environment",
    "known_names",
    "parse_every",
    "shared",
    "unknown_names",
]

_CHOICES = {
    "compression": ("none", "fp16", "bf16"),
    "batch_size": ("per_rank", "global"),
    "steps": ("batches", "global"),
    "lr_scaling": ("none", "linear"),
    "stdout": ("root", "all"),
    "mpi": ("auto", "on", "off"),
    "native": ("auto", "on", "off"),
    "resume": ("auto", "force", "fresh"),
    "elastic": ("auto", "off"),
    "backprop_order": ("off", "weights_first", "blocks"),
}


@dataclasses.dataclass
class Settings:
    """The plugin's settings; one instance lives in `SETTINGS`."""

    # `batch_size` passed to fit/evaluate/predict is per rank (global batch is
    # N * batch_size) or the global batch.
    batch_size: str = "per_rank"
    # fit's `steps_per_epoch` / `validation_steps` count the script's batches
    # (an epoch covers the data it covers in one process, in 1/N the steps;
    # adapters/step_counts.py) or global steps of N batches.
    steps: str = "batches"
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
    # A checkpoint of another run (other model, optimizer, data) or with
    # numbers out of bounds: "auto" refuses it, naming what differs; "force"
    # resumes another run's anyway; "fresh" sets it aside and starts afresh.
    resume: str = "auto"
    # Gradient exchange: largest bucket (MB; each is exchanged while the
    # backward pass goes on, see docs/performance.md for the measurements
    # behind 4), optional 16-bit compression, and a Chrome-trace timeline.
    fusion_mb: float = 4.0
    compression: str = "none"
    # "weights_first": each layer's weight gradient before its input
    # gradient; "blocks": and a large one in blocks of `fusion_mb`, sent one
    # by one (tf/backprop_order.py): the exchange starts earlier, which pays
    # on slow links only (docs/scaling.md). "off": TensorFlow's own order.
    backprop_order: str = "off"
    timeline: str = ""
    # The compiled exchange op ("auto": used when it builds, else the numpy
    # exchange with a warning; "on": required; "off": never).
    native: str = "auto"
    # A lost rank under an MPI with ULFM: "auto" goes on with the survivors
    # (core/elastic.py) while at least `min_ranks` are left; "off" ends the
    # job, as without ULFM.
    elastic: str = "auto"
    min_ranks: int = 1
    # Missing values (empty / NA cells, NaN, masked or fill entries) read by
    # transparent_dist.data come through as NaN instead of ending the job; a
    # reader's allow_nan= keyword wins.
    allow_nan: bool = False
    # More messages from the plugin (on every rank).
    verbose: bool = False
    # The whole plugin off: plain Keras / TensorFlow.
    disable: bool = False


def _validate(key: str, value: object, name: str | None = None) -> object:
    """`value` checked (and converted) for setting `key`; the error names
    `name` (the environment variable) or the keyword of `configure()`."""
    shown, raw = name or key, value
    choices = _CHOICES.get(key)
    if choices is not None and value not in choices:
        raise ValueError(f"transparent_dist: {shown}={value!r} is not one of: {', '.join(choices)}")
    if key in ("warmup_epochs", "stall_warn", "stall_abort", "fusion_mb"):
        try:
            value = float(value)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(
                f"transparent_dist: {shown}={value!r} is not a number (seconds, MB or epochs)"
            ) from None
        if value < 0:
            raise ValueError(f"transparent_dist: {shown}={raw!r} must be >= 0")
    if key in ("checkpoint_keep", "min_ranks"):
        try:
            value = int(value)  # type: ignore[arg-type]
        except ValueError:
            raise ValueError(f"transparent_dist: {shown}={value!r} is not a whole number") from None
        if value < 1:
            raise ValueError(f"transparent_dist: {shown}={raw!r} must be >= 1")
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


def from_environment(
    environ: os._Environ | dict | None = None, errors: list[str] | None = None
) -> Settings:
    """Reads the `TD_*` variables into a new `Settings`. A bad value raises
    ValueError naming the variable, or, given `errors`, is appended there
    (one line each) and the default kept, for the caller to report."""
    env = os.environ if environ is None else environ
    settings = Settings()
    for field in dataclasses.fields(Settings):
        name = "TD_" + field.name.upper()
        try:
            if field.type == "bool":
                setattr(settings, field.name, _env_bool(env, name, field.default))
            elif name in env and env[name] != "":
                value = env[name].strip()
                if field.name in _CHOICES:
                    value = value.lower()
                setattr(settings, field.name, _validate(field.name, value, name))
        except ValueError as error:
            if errors is None:
                raise
            errors.append(str(error))
    return settings


# Variables with the prefix that are read elsewhere (not `Settings` fields).
_OTHER_NAMES = ("TD_CACHE_DIR", "TD_PLACEMENT")


def known_names() -> list[str]:
    """Every `TD_*` variable the plugin reads."""
    return ["TD_" + f.name.upper() for f in dataclasses.fields(Settings)] + list(_OTHER_NAMES)


def unknown_names(environ: os._Environ | dict | None = None) -> list[tuple[str, str | None]]:
    """`(name, closest known name or None)` for each `TD_*` variable in the
    environment that the plugin does not read (a misspelt setting is
    otherwise ignored without a word)."""
    env = os.environ if environ is None else environ
    known = known_names()
    found = []
    for name in sorted(env):
        if name.startswith("TD_") and name not in known:
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            found.append((name, close[0] if close else None))
    return found


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _env_bool(env, name: str, default: bool) -> bool:
    value = env.get(name)
    if value is None or value == "":
        return default
    value = value.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"transparent_dist: {name}={env[name]!r} is not one of: {', '.join(_TRUE + _FALSE)}"
        )
    return value in _TRUE


# Bad values found in the environment at import, reported by `activate`
# (from rank 0, one line each) rather than as a traceback from every rank.
ERRORS: list[str] = []
SETTINGS = from_environment(errors=ERRORS)

# Settings that may differ between ranks: they change no collective and no
# arithmetic (what a rank prints, how long the watchdog waits, where a
# rank's timeline goes). `mpi` and `disable` decide whether a rank joins at
# all, so they cannot be compared by the ranks that do. Every other setting,
# including any added later, must be alike on every rank.
PER_RANK = frozenset(
    {"stdout", "verbose", "stall_warn", "stall_abort", "timeline", "mpi", "disable"}
)


def shared(settings: Settings | None = None) -> dict[str, object]:
    """The settings every rank must hold alike, by environment variable
    name (`{"TD_BATCH_SIZE": "per_rank", ...}`), for the ranks to compare."""
    settings = SETTINGS if settings is None else settings
    return {
        "TD_" + field.name.upper(): getattr(settings, field.name)
        for field in dataclasses.fields(Settings)
        if field.name not in PER_RANK
    }


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
