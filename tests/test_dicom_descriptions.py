"""Per-source class descriptions (#18): a ``[[sources]]`` ``class_description`` ("brain CT slice" for class
"head CT") reaches the text prompts of every detector that has them (Bayes-PFL, AA-CLIP, WinCLIP) through
the detector surface, and is part of the model version's identity, so each result's version says what its
prompts said. Tiny random backbones; the pipeline test runs the real CLI.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import create_engine, select

from inspector.config import ConfigError, load_settings
from inspector.store.schema import images, model_versions, results, sources
from inspector.versions import build, recipe_from_settings, with_class_descriptions

from .conftest import tiny_detector_settings
from .pipeline_helpers import run_cli, small_png

pytestmark = pytest.mark.usefixtures("one_thread")

CLASS, WORDS = "head CT", "brain CT slice"


def _image() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))


def _build(kind: str, descriptions: dict[str, str] | None = None):
    settings = tiny_detector_settings(kind)
    recipe = with_class_descriptions(recipe_from_settings(settings), descriptions)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return recipe, build(recipe, settings)


def _same(a, b) -> bool:
    return torch.equal(a.image_score, b.image_score) and torch.equal(a.text_score, b.text_score) and \
        torch.equal(a.anomaly_map, b.anomaly_map)


@pytest.mark.parametrize("kind", ["aa-clip", "winclip"])
def test_the_description_is_what_the_prompts_say(kind):
    """Class "head CT" described as "brain CT slice" scores exactly as a class named "brain CT slice"."""
    plain_recipe, plain = _build(kind)
    recipe, described = _build(kind, {CLASS: WORDS})
    image = _image()
    with torch.inference_mode():
        own = described.predict(image, CLASS)
        named = plain.predict(image, WORDS)
        undescribed = plain.predict(image, CLASS)
    assert _same(own, named)
    assert not torch.equal(own.text_score, undescribed.text_score)  # the words changed the numbers
    assert recipe.digest != plain_recipe.digest and recipe.identity["class_descriptions"] == {CLASS: WORDS}
    assert described.provenance["class_descriptions"] == {CLASS: WORDS}
    with torch.inference_mode():  # other classes keep their names
        assert _same(described.predict(image, "screw"), plain.predict(image, "screw"))


def test_bayes_pfl_writes_the_description_into_its_prompt():
    from inspector.detectors.bayes_pfl.model import prompt_name

    _, plain = _build("bayes-pfl")
    _, described = _build("bayes-pfl", {CLASS: WORDS})
    with torch.inference_mode():
        ours, theirs = described._class_prompt(CLASS), plain._class_prompt(WORDS)
        assert torch.equal(ours.suffix, theirs.suffix) and ours.last == theirs.last
        assert not torch.equal(ours.suffix, plain._class_prompt(CLASS).suffix)
        assert prompt_name(CLASS) == "head ct"
        image = _image()
        assert not torch.equal(described.predict(image, CLASS).text_score, plain.predict(image, CLASS).text_score)
    described.set_class_descriptions({})  # cleared: the prompt is the class name's again (no stale cache)
    with torch.inference_mode():
        assert torch.equal(described._class_prompt(CLASS).suffix, plain._class_prompt(CLASS).suffix)


def test_identity_of_described_versions():
    settings = tiny_detector_settings("winclip")
    plain = recipe_from_settings(settings)
    assert with_class_descriptions(plain, None) is plain and with_class_descriptions(plain, {CLASS: ""}) is plain
    assert with_class_descriptions(plain, {CLASS: CLASS}) is plain  # its own name: nothing to describe
    one = with_class_descriptions(plain, {CLASS: WORDS})
    assert one.name == f"winclip@{one.digest[:12]}" and one.name != plain.name
    assert with_class_descriptions(plain, {CLASS: "brain CT"}).digest != one.digest
    assert with_class_descriptions(plain, {CLASS: WORDS}).digest == one.digest  # stable
    musc = recipe_from_settings(tiny_detector_settings("musc"))
    assert with_class_descriptions(musc, {CLASS: WORDS}) is musc  # no text prompts: the same version


def test_class_description_in_sources_is_checked(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(f'[[sources]]\npath = "/x"\nclass_name = "{CLASS}"\nclass_description = "  {WORDS} "\n')
    assert load_settings(config, environ={}).sources[0].class_description == WORDS
    config.write_text('[[sources]]\npath = "/x"\nclass_name = "c"\nclass_description = "a\\u0007b"\n')
    with pytest.raises(ConfigError, match="class_description: 'a\\\\x07b' contains control characters"):
        load_settings(config, environ={})


def test_watch_scores_a_described_source_under_a_version_that_records_its_words(tmp_path):
    described, plain = tmp_path / "ct", tmp_path / "ct-plain"
    for folder, seed in ((described, 0), (plain, 10)):
        folder.mkdir()
        for i in range(2):
            small_png(folder / f"{i}.png", seed + i)
    lines = [f'[[sources]]\npath = "{described}"\nclass_name = "{CLASS}"\nclass_description = "{WORDS}"\n',
             f'[[sources]]\npath = "{plain}"\nclass_name = "{CLASS}"\n']
    (tmp_path / "config.toml").write_text("\n".join(lines))
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", "--once"], db, tmp_path, env={"INSPECTOR_MODEL__DETECTOR": "winclip"})
    assert done.returncode == 0, done.stderr[-3000:]
    engine = create_engine(db)
    with engine.connect() as conn:
        rows = conn.execute(select(sources.c.path, sources.c.pinned_version_id, model_versions.c.manifest,
                                   results.c.model_version_id)
                            .join(images, images.c.source_id == sources.c.id)
                            .join(results, results.c.image_id == images.c.id)
                            .join(model_versions, model_versions.c.id == results.c.model_version_id)).all()
    engine.dispose()
    by_folder: dict[str, set] = {}
    for row in rows:
        identity = json.loads(row.manifest)["identity"]
        by_folder.setdefault(row.path, set()).add((row.model_version_id, json.dumps(identity.get("class_descriptions"))))
    assert len(rows) == 4
    (own,) = by_folder[str(described)]
    (other,) = by_folder[str(plain)]
    assert own[1] == json.dumps({CLASS: WORDS}) and other[1] == "null" and own[0] != other[0]
    assert {r.pinned_version_id for r in rows if r.path == str(described)} == {own[0]}  # pinned to its words


def test_another_box_serves_a_described_registered_version(tmp_path):
    """A worker that did not record the version (no [[sources]] of its own) builds it from the registry and
    the descriptions its manifest recorded: the same digest, the same words in the prompts."""
    from inspector.pipeline import Models, record_version
    from inspector.registry import register_model
    from inspector.store import open_store
    from inspector.versions import recipe_from_registry

    settings = tiny_detector_settings("winclip")
    settings.override("registry", path=str(tmp_path / "models"))
    _, detector = _build("winclip")
    register_model(tmp_path / "models", "wc-v1", detector, {"kind": "test"})
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    plain = recipe_from_registry(settings, "wc-v1")
    recipe = with_class_descriptions(plain, {CLASS: WORDS})
    version = record_version(engine, recipe)
    assert version != record_version(engine, plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = Models(engine, settings).get(version)  # a fresh process: only the database and the registry
    assert served is not None and served.class_descriptions == {CLASS: WORDS}
    assert served.provenance["digest"] == recipe.digest
    with torch.inference_mode():
        _, plain_detector = _build("winclip")
        assert _same(served.predict(_image(), CLASS), plain_detector.predict(_image(), WORDS))
    engine.dispose()
