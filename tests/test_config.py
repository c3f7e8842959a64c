import pytest

from offside.config import flatten, from_dict, load_yaml
from offside.errors import OffsideError
from offside.stages import UnlearnConfig


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text("method: ga\ntrain:\n  lr: 0.1\n  learning_rate: 3\n")
    with pytest.raises(OffsideError) as err:
        load_yaml(UnlearnConfig, path)
    assert "train.learning_rate" in str(err.value) and str(path) in str(err.value)


def test_wrong_type_names_key():
    with pytest.raises(OffsideError, match="'train.epochs' must be int"):
        from_dict(UnlearnConfig, {"train": {"epochs": "three"}}, "cfg")


def test_nested_values_and_overrides(tmp_path):
    path = tmp_path / "u.yaml"
    path.write_text("method: gd\ntrain:\n  lr: 1\n")
    config = load_yaml(UnlearnConfig, path, {"train": {"epochs": 7}, "model": {"lora": {"r": 4}}})
    assert config.method == "gd" and config.train.lr == 1.0 and config.train.epochs == 7
    assert config.model.lora.r == 4 and config.model.lora.targets == ["q_proj", "v_proj"]


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a.b": 1, "a.c.d": 2, "e": 3}


def test_partial_section_keeps_that_sections_defaults():
    from offside.stages import RelearnConfig

    config = from_dict(RelearnConfig, {"train": {"lr": 1e-3}, "model": {"name": "m"}}, "cfg")
    assert config.train.lr == 1e-3 and config.train.epochs == 6  # the published relearning epochs stay
    assert config.model.name == "m" and config.model.freeze_vision is True


def test_exponent_floats_without_a_dot_are_floats():
    from offside.engine.trainer import TrainSpec

    assert from_dict(TrainSpec, {"lr": "4e-4"}).lr == 4e-4  # YAML 1.1 reads 4e-4 as a string
    with pytest.raises(OffsideError, match="'lr' must be float"):
        from_dict(TrainSpec, {"lr": "fast"})
