"""Settings are checked where users set them: a wrong value or a misspelt
name is one line naming the variable; the settings ranks must share are
known (in-process: no MPI job)."""

from __future__ import annotations

import dataclasses

import pytest

from transparent_dist.core import config


def test_a_wrong_value_names_the_variable_and_the_allowed_values():
    with pytest.raises(ValueError) as raised:
        config.from_environment({"TD_BATCH_SIZE": "golbal"})
    assert str(raised.value) == (
        "transparent_dist: TD_BATCH_SIZE='golbal' is not one of: per_rank, global"
    )
    errors: list[str] = []
    settings = config.from_environment(
        {"TD_FUSION_MB": "lots", "TD_VERBOSE": "maybe", "TD_CHECKPOINT_KEEP": "0"}, errors
    )
    assert settings.fusion_mb == 4.0  # the default kept, the error reported
    assert errors == [
        "transparent_dist: TD_CHECKPOINT_KEEP='0' must be >= 1",
        "transparent_dist: TD_FUSION_MB='lots' is not a number (seconds, MB or epochs)",
        "transparent_dist: TD_VERBOSE='maybe' is not one of: 1, true, yes, on, 0, false, no, off",
    ]


def test_misspelt_names_get_the_closest_known_one():
    found = config.unknown_names(
        {"TD_CHEKPOINT_DIR": "/x", "TD_BATCHSIZE": "global", "TD_WHATEVER": "1", "HOME": "/"}
    )
    assert found == [
        ("TD_BATCHSIZE", "TD_BATCH_SIZE"),
        ("TD_CHEKPOINT_DIR", "TD_CHECKPOINT_DIR"),
        ("TD_WHATEVER", None),
    ]
    assert config.unknown_names({"TD_CACHE_DIR": "/c", "TD_PLACEMENT": "off"}) == []


def test_every_setting_but_the_per_rank_ones_must_be_shared():
    shared = config.shared(config.Settings())
    names = {f.name for f in dataclasses.fields(config.Settings)}
    assert set(shared) == {"TD_" + n.upper() for n in names - config.PER_RANK}
    for must in ("TD_BATCH_SIZE", "TD_NATIVE", "TD_CHECKPOINT_DIR", "TD_COMPRESSION"):
        assert must in shared
    assert "TD_STDOUT" not in shared and "TD_VERBOSE" not in shared
