"""RefineConfig: frozen sections, one name per setting, every bad setting listed."""

from __future__ import annotations

import dataclasses

import pytest

from onnxfbp.config import (
    HeadConfig,
    MinibatchConfig,
    RefineConfig,
    RunConfig,
    SweepConfig,
)
from onnxfbp.errors import ConfigError


def test_flat_names_land_in_their_sections() -> None:
    config = RefineConfig.of(device="cpu", epochs=1.0, step_batch=50, target_step=5.0,
                             l2_grid=(0.1,), schedule="jacobi", min_gain=0.01)
    assert config.run == RunConfig(device="cpu")
    assert config.minibatch == MinibatchConfig(epochs=1.0, step_batch=50)
    assert config.sweep == SweepConfig(target_step=5.0)
    assert config.head == HeadConfig(l2_grid=(0.1,))
    assert config.schedule == "jacobi" and config.gate.min_gain == 0.01
    assert config.replace(epochs=2.0).minibatch.epochs == 2.0
    assert config.minibatch.epochs == 1.0  # replace gives a copy


def test_sections_are_frozen() -> None:
    config = RefineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.schedule = "jacobi"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.minibatch.epochs = 3.0  # type: ignore[misc]


def test_nested_dict_round_trip() -> None:
    config = RefineConfig.of(device="cpu", max_layers=2, sweeps=2)
    report = config.to_dict()
    assert report["layers"]["max_layers"] == 2 and report["run"]["device"] == "cpu"
    assert RefineConfig.from_settings(report) == config


def test_every_name_is_unique() -> None:
    names = [f.name for section in ("run", "split", "layers", "minibatch", "sweep", "head",
                                    "gate")
             for f in dataclasses.fields(getattr(RefineConfig(), section))]
    assert len(names) == len(set(names))


def test_each_bad_setting_is_listed() -> None:
    with pytest.raises(ConfigError) as info:
        RefineConfig.of(epochs=0.0, holdout=1.5, batch_size=-4, schedule="adam")
    msg = str(info.value)
    assert msg.startswith("setting out of range: ") and msg.endswith("; change it and rerun")
    for fragment in ("epochs 0.0 (a positive number)", "holdout 1.5", "batch_size -4",
                     "schedule 'adam'"):
        assert fragment in msg


def test_unknown_and_old_names_are_refused() -> None:
    for old in ("learning_rate", "minibatch_size", "invert_convs", "step"):
        with pytest.raises(ConfigError, match=f"unknown setting {old}"):
            RefineConfig.of(**{old: 1})
