import pytest

from inspector.config import ConfigError, load_settings


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_defaults_without_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings(environ={})
    # empty backbone keys mean "the detector's own" (its paper's backbone)
    assert s.model.backbone == "" and s.bayes_pfl.samples == 10 and s.model.feature_layers == []
    assert s.model.detector == "bayes-pfl" and s.model.fallback == "winclip"
    from inspector.registry import backbone_spec

    assert backbone_spec(s).arch == "ViT-L-14-336" and backbone_spec(s).feature_layers == (6, 12, 18, 24)
    assert backbone_spec(s, "winclip").arch == "ViT-B-16-plus-240" and backbone_spec(s, "winclip").image_size == 240
    assert s.database.url.startswith("sqlite:///")


def test_precedence_file_env_flags(tmp_path):
    path = write(tmp_path, '[model]\nbackbone = "test-tiny"\nfeature_layers = [1, 2]\n[bayes_pfl]\nsamples = 4\n')
    s = load_settings(path, environ={"INSPECTOR_BAYES_PFL__SAMPLES": "7", "INSPECTOR_BENCH__BATCH_SIZES": "1,4"})
    assert s.model.backbone == "test-tiny"  # file beats default
    assert s.bayes_pfl.samples == 7  # env beats file
    assert s.model.feature_layers == [1, 2]
    assert s.bench.batch_sizes == [1, 4]
    s.override("bayes_pfl", samples=2).override("model", backbone=None)  # flags beat env; None = not given
    assert s.bayes_pfl.samples == 2 and s.model.backbone == "test-tiny"


def test_moved_key_says_where_it_went(tmp_path):
    path = write(tmp_path, '[model]\nsamples = 4\n')
    with pytest.raises(ConfigError, match=r"\[model\] samples .* is now \[bayes_pfl\] samples"):
        load_settings(path, environ={})


def test_config_env_variable_names_the_file(tmp_path):
    path = write(tmp_path, '[database]\nurl = "sqlite:///x.db"\n')
    assert load_settings(environ={"INSPECTOR_CONFIG": str(path)}).database.url == "sqlite:///x.db"


@pytest.mark.parametrize("text, message", [
    ("[model]\nsampels = 3\n", "unknown key 'sampels'"),
    ("[modle]\nsamples = 3\n", "unknown config section [modle]"),
    ("[bayes_pfl]\nsamples = 'many'\n", "cannot use 'many'"),
    ("[model\n", "not valid TOML"),
])
def test_bad_config_is_a_clear_error(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_settings(write(tmp_path, text), environ={})


def test_bad_env_value(tmp_path):
    with pytest.raises(ConfigError, match="INSPECTOR_MODEL__ALLOW_RANDOM_WEIGHTS"):
        load_settings(write(tmp_path, ""), environ={"INSPECTOR_MODEL__ALLOW_RANDOM_WEIGHTS": "maybe"})


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_settings("/nonexistent/config.toml", environ={})


def test_repository_config_toml_is_valid_and_all_defaults():
    from pathlib import Path

    from inspector.config import Settings

    s = load_settings(Path(__file__).parents[1] / "config.toml", environ={})
    assert s.as_dict() == Settings().as_dict()


def test_named_datasets(tmp_path):
    path = write(tmp_path, '[datasets.mvtec]\npath = "/data/mvtec.tar.xz"\n[datasets.weld]\npath = "w"\n')
    assert load_settings(path, environ={}).datasets == {"mvtec": "/data/mvtec.tar.xz", "weld": "w"}
    with pytest.raises(ConfigError, match=r"\[datasets.bad\]"):
        load_settings(write(tmp_path, "[datasets.bad]\nroot = 'x'\n"), environ={})
