import pytest

from tidy_detect.config import ExtractionConfig, FeatureConfig, RuntimeConfig, builtin_presets, load_preset
from tidy_detect.errors import ConfigError, UnknownNameError


def test_defaults_are_the_papers():
    config = ExtractionConfig()
    assert config.models.clip == "openai/clip-vit-large-patch14"
    assert config.models.captioner == "blip2"
    assert config.models.grounder == "grounding-dino"
    assert config.features.max_objects == 6
    assert config.features.global_view == "center-crop"


def test_validation_messages():
    with pytest.raises(ConfigError, match="features.max_objects must be in \\[0, 64\\], got -1"):
        FeatureConfig(max_objects=-1)
    with pytest.raises(ConfigError, match="runtime.dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"):
        RuntimeConfig(dtype="fp8")
    with pytest.raises(ConfigError, match="global_view must be one of"):
        FeatureConfig(global_view="resize")


def test_presets_load_and_unknown_keys(tmp_path):
    for name in builtin_presets():
        assert isinstance(load_preset(name), ExtractionConfig)
    assert load_preset("fast").models.grounder == "none"
    with pytest.raises(UnknownNameError, match="Unknown preset 'nope'.*Known presets: .*paper"):
        load_preset("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("[models]\nclipp = 'x'\n")
    with pytest.raises(ConfigError, match="unknown option 'clipp'; known: .*clip"):
        load_preset(bad)
    bad.write_text("[model]\n")
    with pytest.raises(ConfigError, match="unknown table 'model'"):
        load_preset(bad)
    bad.write_text("[models\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_preset(bad)


def test_relative_model_paths_resolve_against_the_preset(tmp_path):
    preset = tmp_path / "bundle" / "p.toml"
    preset.parent.mkdir()
    preset.write_text('[models]\nclip = "./clip"\ncaptioner_model = "../elsewhere/cap"\n')
    config = load_preset(preset)
    assert config.models.clip == str((tmp_path / "bundle" / "clip").resolve())
    assert config.models.captioner_model == str((tmp_path / "elsewhere" / "cap").resolve())


def test_updated_ignores_none_and_rejects_unknown():
    config = ExtractionConfig().updated(models={"grounder": "none", "clip": None}, runtime={"batch_size": 4})
    assert config.models.grounder == "none" and config.models.clip == "openai/clip-vit-large-patch14"
    assert config.runtime.batch_size == 4
    with pytest.raises(ConfigError, match="unknown models option 'clippy'"):
        ExtractionConfig().updated(models={"clippy": "x"})
