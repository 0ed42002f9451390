"""Config validation: defaults, unknown keys, wrong types, messages that say where and how to fix."""

from __future__ import annotations

from dataclasses import MISSING, fields

import pytest

from histoclip.config import default_config, load_schema, load_yaml, validate_config
from histoclip.errors import InputError


def test_demo_config_is_valid_and_defaults_are_filled(repo):
    config = validate_config(load_yaml(repo / "config" / "demo.yaml"))
    assert config["tiling"] == {
        "target_mpp": 0.5,
        "tile_px": 224,
        "overlap_px": 0,
        "min_tissue_fraction": 0.5,
        "roi_classes": [],
        "shard_size": 110,  # the demo's: 220 slides in 2 tiling jobs
        "threads": 4,
        "stage_dir": None,
    }
    assert config["mpp"] == {"min": 0.05, "max": 20.0}
    assert config["qc"]["thumbnail_px"] == 1024
    assert config["on_slide_error"] == "fail"


def test_the_real_cohort_template_names_the_key_to_fill_in_and_carries_nothing_of_the_demo(repo):
    template = load_yaml(repo / "config" / "config.yaml")
    with pytest.raises(InputError) as raised:
        validate_config(template, source="config/config.yaml")
    message = str(raised.value)
    assert "config/config.yaml" in message and "models.main.model" in message and "is not set" in message
    assert "hf-hub:" in message  # and what to put there
    template["models"]["main"]["model"] = "hf-hub:wisdomik/QuiltNet-B-32"
    config = validate_config(template)
    assert config["training"] == {} and "demo" not in config["models"]
    assert not any("demo" in str(config[key]) for key in ("slides", "clinical", "zeroshot", "retrieval", "survival"))
    assert config["retrieval"]["queries"] == [] and config["zeroshot"]["prompt_sets"] == []
    assert config["survival"]["multivariable"] == [] and config["clinical"] is None
    assert config["on_slide_error"] == "record"


def test_empty_config_gets_every_default():
    config = validate_config({})
    assert config["slides"] == "slides.tsv" and config["clinical"] is None
    assert config["zeroshot"]["prompt_sets"] == [] and config["retrieval"]["queries"] == []
    assert config["tissue"]["mpp"] == 8.0
    assert config["tiling"]["tile_px"] == 224


def test_every_schema_property_has_a_description_and_default():
    def walk(node, path):
        for key, sub in node.get("properties", {}).items():
            where = f"{path}.{key}" if path else key
            assert "default" in sub, f"{where} has no default"
            if sub.get("type") == "object":
                walk(sub, where)
            else:
                assert sub.get("description"), f"{where} has no description"

    walk(load_schema(), "")


def test_unknown_key_is_rejected_with_allowed_keys():
    with pytest.raises(InputError) as err:
        validate_config({"tiling": {"tile_size": 256}}, source="my.yaml")
    message = str(err.value)
    assert "my.yaml" in message
    assert "tiling" in message and "tile_size" in message
    assert "tile_px" in message  # the allowed keys are listed


def test_wrong_type_names_key_and_fix():
    with pytest.raises(InputError) as err:
        validate_config({"tiling": {"tile_px": "big"}, "on_slide_error": "ignore"})
    message = str(err.value)
    assert "tiling.tile_px" in message and "integer" in message
    assert "on_slide_error" in message and "fail" in message


def test_overlap_must_be_smaller_than_tile():
    with pytest.raises(InputError, match="overlap_px"):
        validate_config({"tiling": {"tile_px": 64, "overlap_px": 64}})


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("tiling: [unclosed\n")
    with pytest.raises(InputError, match="bad.yaml"):
        load_yaml(path)


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("slides: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(InputError):
        load_yaml(path)


def test_tissue_schema_defaults_are_the_library_defaults():
    """One concept, one name: config keys under `tissue` are TissueParams fields with the same defaults."""
    from dataclasses import asdict

    from histoclip.tiling.tissue import TissueParams

    tissue = validate_config({})["tissue"]
    assert tissue.pop("mpp") == 8.0
    assert tissue == asdict(TissueParams.from_config(default_config()))


def test_tiling_schema_defaults_are_the_library_defaults():
    from dataclasses import asdict

    from histoclip.tiling.grid import TilingParams

    tiling = validate_config({})["tiling"]
    # how jobs are cut and where they read slides, not the grid
    jobs = {key: tiling.pop(key) for key in ("shard_size", "threads", "stage_dir")}
    assert tiling.pop("roi_classes") == []  # a setting of the slides with an ROI file (histoclip.tiling.roi)
    assert tiling == asdict(TilingParams.from_config(default_config()))
    assert jobs == {"shard_size": 50, "threads": 4, "stage_dir": None}


def _code_defaults(cls: type) -> dict[str, object]:
    """The defaults a dataclass writes itself, by field name."""
    out: dict[str, object] = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def _same(a: object, b: object) -> bool:
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def test_settings_objects_take_every_config_default_from_the_schema():
    """Defaults live in the schema only: no settings dataclass gives a config key a default of its own, and
    from_config of the defaults gives the schema's values (field names are config keys)."""
    from histoclip.cohort.clustering import ClusteringSettings
    from histoclip.cohort.phenotypes import PhenotypeSettings
    from histoclip.plots import FigureStyle
    from histoclip.preflight import SlideSettings
    from histoclip.survival.settings import SurvivalSettings
    from histoclip.tiling.grid import TilingParams
    from histoclip.tiling.slide import MppRange
    from histoclip.tiling.tissue import TissueParams
    from histoclip.zeroshot.calls import CallSettings
    from histoclip.zeroshot.evidence import EvidenceOptions
    from histoclip.zeroshot.fewshot import FewShotSettings
    from histoclip.zeroshot.sensitivity import SensitivitySettings

    config = default_config()
    sections = {
        TilingParams: config["tiling"],
        TissueParams: config["tissue"],
        MppRange: config["mpp"],
        CallSettings: config["zeroshot"],
        SensitivitySettings: config["zeroshot"],
        PhenotypeSettings: config["phenotypes"],
        ClusteringSettings: config["clustering"],
        FewShotSettings: config["fewshot"],
        FigureStyle: config["figures"],
        EvidenceOptions: config["figures"]["evidence"],
        SlideSettings: {"on_slide_error": config["on_slide_error"]},
        SurvivalSettings: config["survival"],
    }
    for cls, section in sections.items():
        repeated = set(_code_defaults(cls)) & {*section, "seed"}
        assert not repeated, f"{cls.__name__} repeats the schema's default of {sorted(repeated)}"
        built = cls.from_config(config)
        for f in fields(cls):
            if f.name in section:
                assert _same(getattr(built, f.name), section[f.name]), (cls.__name__, f.name)
            if f.name == "seed":
                assert built.seed == config["seed"], cls.__name__


def test_defaults_left_in_code_agree_with_the_schema():
    """Defaults still written in code (a model entry's optional keys, which the schema describes without a
    default; survival endpoints and training settings) must equal the schema's wherever it has one for the same key."""
    from histoclip.embedding.models import ModelSpec
    from histoclip.survival.endpoints import Endpoint
    from histoclip.training.settings import TrainSettings

    schema = load_schema()["properties"]
    entries = {
        ModelSpec: schema["models"]["additionalProperties"],
        Endpoint: schema["survival"]["properties"]["endpoints"]["additionalProperties"],
        TrainSettings: schema["training"]["additionalProperties"],
    }
    elsewhere = {"seed": schema["seed"], "abstain_margin": schema["zeroshot"]["properties"]["abstain_margin"]}
    for cls, node in entries.items():
        for name, default in _code_defaults(cls).items():
            prop = node["properties"].get(name) or elsewhere.get(name, {})
            if "default" in prop:
                assert _same(default, prop["default"]), (
                    f"{cls.__name__}.{name} = {default!r}, schema: {prop['default']!r}"
                )
