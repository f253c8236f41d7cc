"""cbir.config: params.yaml -> typed settings; every problem is one ConfigError line."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cbir.augment import STRATEGIES
from cbir.config import NO_LIMIT, Settings, TrainSettings, load_settings
from cbir.errors import ConfigError


def _params(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_a_missing_params_file_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"params file not found: .*nowhere\.yaml"):
        load_settings(tmp_path / "nowhere.yaml")


def test_an_empty_params_file_gives_every_default(tmp_path):
    settings = load_settings(_params(tmp_path, ""))
    assert settings.root == tmp_path and settings.params_path == tmp_path / "params.yaml"
    assert settings.embed.scales == [1.0, 1.25] and settings.train.augmentation == "heritage"
    assert settings.path(settings.data.manifest_dir) == tmp_path / "data" / "manifest"


@pytest.mark.parametrize("text,fragment", [
    ("ingest: [1, 2\n", "not valid YAML: "),
    ("- a\n- b\n", "expected a mapping of sections at the top level"),
    ("ingest: 3\n", "invalid params"),
])
def test_malformed_params_are_one_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        load_settings(_params(tmp_path, text))
    assert "\n" not in str(info.value)


def test_a_params_file_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(b"search:\n  k: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load_settings(path)


@pytest.mark.parametrize("text,fragment", [
    ("serach:\n  k: 5\n", "serach: unknown key; did you mean search?"),
    ("search:\n  kk: 5\n", "search.kk: unknown key; did you mean search.k?"),
    ("search:\n  zzzzzz: 5\n", "search.zzzzzz: unknown key"),
])
def test_unknown_keys_are_refused_with_a_suggestion(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as info:
        load_settings(_params(tmp_path, text))
    assert fragment in str(info.value)
    if "zzzzzz" in text:
        assert "did you mean" not in str(info.value)


@pytest.mark.parametrize("text,fragment", [
    ("search:\n  k: 0\n", "search.k: Input should be greater than or equal to 1"),
    ("train:\n  augmentation: autoaugment\n", "train.augmentation"),
    ("ingest:\n  workers: yes\n", "ingest.workers"),
    ("search:\n  precision_target: .nan\n", "search.precision_target"),
])
def test_values_out_of_range_or_of_the_wrong_type_are_refused(tmp_path, text, fragment):
    with pytest.raises(ConfigError, match="invalid params") as info:
        load_settings(_params(tmp_path, text))
    assert fragment in str(info.value)


def test_overrides_set_dotted_keys_and_are_validated(tmp_path):
    path = _params(tmp_path, "search:\n  k: 5\n")
    settings = load_settings(path, {"search.k": 7, "train.resolution": 64})
    assert settings.search.k == 7 and settings.train.resolution == 64
    assert load_settings(path).search.k == 5  # the file is not changed
    with pytest.raises(ConfigError, match=r"search\.k"):
        load_settings(path, {"search.k": -1})


def test_limits_saturate_and_derived_settings_follow_their_source(tmp_path):
    settings = load_settings(_params(tmp_path, "report:\n  max_pairs: 1000000000000000000000\n"
                                     "embed:\n  resolution: train\ntrain:\n  resolution: 48\n"))
    assert settings.report.max_pairs == NO_LIMIT
    assert settings.embed_resolution == 48
    assert load_settings(tmp_path / "params.yaml", {"embed.resolution": 96}).embed_resolution == 96


def test_decode_workers_are_ingest_workers_or_every_core(tmp_path):
    assert load_settings(_params(tmp_path, "ingest:\n  workers: 3\n")).decode_workers == 3
    assert load_settings(_params(tmp_path, "ingest:\n  workers: 0\n")).decode_workers == \
        (os.cpu_count() or 1)


def test_the_augmentation_names_are_those_of_cbir_augment():
    assert TrainSettings.model_fields["augmentation"].annotation is not None
    for name in STRATEGIES:
        assert TrainSettings(augmentation=name).augmentation == name
    assert set(STRATEGIES) == {"simclr", "heritage"}
    assert "root" in Settings.model_fields


# Moved from tests/test_hostile.py (issue 12's bounded YAML), assertions unchanged.
def test_params_yaml_with_modest_aliases_and_merge_keys_still_loads(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train: {resolution: &side 64, seed: 3}\nembed: {resolution: *side}\n"
                      "index: {<<: {seed: 1, bytes_per_vector: 16}, seed: 2}\n")
    settings = load_settings(params)
    assert settings.embed_resolution == 64 and settings.index.seed == 2
    assert settings.index.bytes_per_vector == 16
