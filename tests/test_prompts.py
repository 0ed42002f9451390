"""Prompt sets: shipped files load, bad files fail with messages that name the file and the culprit."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from histoclip.demo import CLASS_SYNONYMS, SUBTYPES
from histoclip.errors import InputError
from histoclip.training.captions import CAPTION_TEMPLATES
from histoclip.zeroshot.prompts import PLACEHOLDER, PromptSet, load_prompt_set, to_conch_json

PROMPTS = Path(__file__).resolve().parents[1] / "config" / "prompts"
SHIPPED = sorted(PROMPTS.glob("*.yaml"))

GOOD = """\
description: test set
templates: ["CLASSNAME.", "an H&E image of CLASSNAME."]
classes:
  A:
    synonyms: ["alpha", "first class"]
  B:
    synonyms: ["beta"]
    templates: ["a photomicrograph of CLASSNAME."]
background:
  bg: {synonyms: ["background tissue"]}
"""


def write(tmp_path: Path, text: str, name: str = "set.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_prompt_sets_load():
    names = {path.stem for path in SHIPPED}
    assert {"nsclc", "rcc", "brca", "crc-tissue", "demo"} <= names
    for path in SHIPPED:
        ps = load_prompt_set(path)
        assert ps.name == path.stem
        assert len(ps.classes) >= 2
        for cls in ps.all_classes:
            assert len(ps.templates[cls]) >= 5, (path.name, cls)
            assert 3 <= len(ps.synonyms(cls)) <= 6, (path.name, cls)
        assert len(ps.sha256) == 64


def test_shipped_class_names():
    assert load_prompt_set(PROMPTS / "nsclc.yaml").called_classes == ["LUAD", "LUSC"]
    assert load_prompt_set(PROMPTS / "rcc.yaml").called_classes == ["CCRCC", "PRCC", "CHRCC"]
    assert load_prompt_set(PROMPTS / "brca.yaml").called_classes == ["IDC", "ILC"]
    crc = load_prompt_set(PROMPTS / "crc-tissue.yaml")
    assert crc.called_classes == ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]
    assert crc.background == {}


def test_demo_matches_synth():
    """The demo's tiny CLIP is trained on synth's captions, so its prompts must be the same words."""
    ps = load_prompt_set(PROMPTS / "demo.yaml")
    assert ps.called_classes == list(SUBTYPES) == ["adenocarcinoma", "squamous"]
    assert list(ps.background) == ["stroma", "necrosis", "lymphocytes", "fat"]
    assert set(ps.all_classes) == set(CLASS_SYNONYMS)
    expected_templates = tuple(t.replace("{}", PLACEHOLDER) for t in CAPTION_TEMPLATES)
    for cls in ps.all_classes:
        assert ps.synonyms(cls) == CLASS_SYNONYMS[cls]
        assert ps.templates[cls] == expected_templates
    # the prompts are exactly the captions synth can write for that class
    captions = {t.format(s) for t in CAPTION_TEMPLATES for s in CLASS_SYNONYMS["necrosis"]}
    assert set(ps.prompts("necrosis")) == captions


def test_parse_good_file(tmp_path):
    ps = load_prompt_set(write(tmp_path, GOOD))
    assert ps.name == "set"
    assert ps.description == "test set"
    assert ps.classes == {"A": ("alpha", "first class"), "B": ("beta",)}
    assert ps.background == {"bg": ("background tissue",)}
    assert ps.all_classes == ["A", "B", "bg"]
    assert ps.templates["A"] == ("CLASSNAME.", "an H&E image of CLASSNAME.")
    assert ps.templates["B"] == ("a photomicrograph of CLASSNAME.",)
    assert ps.templates["bg"] == ps.templates["A"]
    assert ps.prompts("A") == ["alpha.", "an H&E image of alpha.", "first class.", "an H&E image of first class."]
    assert ps.prompts("B") == ["a photomicrograph of beta."]
    with pytest.raises(KeyError):
        ps.prompts("C")


def test_shorthand_list_is_synonyms(tmp_path):
    ps = load_prompt_set(write(tmp_path, 'templates: ["CLASSNAME."]\nclasses:\n  A: ["a"]\n  B: ["b"]\n'))
    assert ps.classes == {"A": ("a",), "B": ("b",)}


def test_single_class_loads(tmp_path):
    ps = load_prompt_set(write(tmp_path, 'templates: ["CLASSNAME."]\nclasses:\n  A: ["a"]\n'))
    assert ps.called_classes == ["A"]


BAD = {
    "no classes section": ('templates: ["CLASSNAME."]\n', "classes"),
    "empty classes": ('templates: ["CLASSNAME."]\nclasses: {}\n', "classes"),
    "empty synonyms": ('templates: ["CLASSNAME."]\nclasses:\n  LUAD: {synonyms: []}\n  LUSC: ["x"]\n', "LUAD"),
    "missing synonyms": ('templates: ["CLASSNAME."]\nclasses:\n  LUAD: {}\n', "LUAD"),
    "blank synonym": ('templates: ["CLASSNAME."]\nclasses:\n  LUAD: ["a", " "]\n', "LUAD"),
    "no placeholder": (
        'templates: ["CLASSNAME.", "an image of tissue."]\nclasses:\n  A: ["a"]\n',
        "an image of tissue.",
    ),
    "class template no placeholder": (
        'templates: ["CLASSNAME."]\nclasses:\n  A: {synonyms: ["a"], templates: ["a classname."]}\n',
        "a classname.",
    ),
    "duplicate yaml key": ('templates: ["CLASSNAME."]\nclasses:\n  LUAD: ["a"]\n  LUAD: ["b"]\n', "LUAD"),
    "class and background": (
        'templates: ["CLASSNAME."]\nclasses:\n  A: ["a"]\n  B: ["b"]\nbackground:\n  A: ["c"]\n',
        "'A'",
    ),
    "unknown top key": ('templates: ["CLASSNAME."]\nclases:\n  A: ["a"]\n', "clases"),
    "unknown class key": ('templates: ["CLASSNAME."]\nclasses:\n  A: {synonym: ["a"]}\n', "synonym"),
    "no templates": ('classes:\n  A: ["a"]\n', "'A'"),
    "synonym twice": ('templates: ["CLASSNAME."]\nclasses:\n  A: ["a", "a"]\n', "'a'"),
    "synonym in two classes": ('templates: ["CLASSNAME."]\nclasses:\n  A: ["tumour"]\n  B: ["tumour"]\n', "tumour"),
    "not a mapping": ("- just\n- a list\n", "set.yaml"),
    "broken yaml": ('classes: [unclosed\n  A: "a"\n', "YAML"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_files_name_file_and_culprit(tmp_path, case):
    text, culprit = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(InputError) as info:
        load_prompt_set(path)
    message = str(info.value)
    assert str(path) in message
    assert culprit in message


def test_duplicate_key_message_gives_lines(tmp_path):
    path = write(tmp_path, 'templates: ["CLASSNAME."]\nclasses:\n  LUAD: ["a"]\n  LUSC: ["b"]\n  LUAD: ["c"]\n')
    with pytest.raises(InputError, match=r"'LUAD' appears twice.*lines 3 and 5"):
        load_prompt_set(path)


def test_wrong_suffix_and_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"\.yaml, \.yml or \.json"):
        load_prompt_set(write(tmp_path, GOOD, "set.txt"))
    with pytest.raises(InputError, match="does not exist"):
        load_prompt_set(tmp_path / "missing.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, '!!python/object/apply:os.system ["true"]\n')
    with pytest.raises(InputError, match="not valid YAML"):
        load_prompt_set(path)


CONCH = {
    "0": {
        "classnames": {
            "LUAD": ["adenocarcinoma", "lung adenocarcinoma"],
            "LUSC": ["squamous cell carcinoma", "lung squamous cell carcinoma"],
        },
        "templates": ["CLASSNAME.", "a photomicrograph showing CLASSNAME.", "an H&E image of CLASSNAME."],
    }
}


def test_conch_json(tmp_path):
    path = tmp_path / "nsclc_conch.json"
    path.write_text(json.dumps(CONCH, indent=4))
    ps = load_prompt_set(path)
    assert ps.name == "nsclc_conch"
    assert ps.classes == {k: tuple(v) for k, v in CONCH["0"]["classnames"].items()}
    assert ps.background == {}
    assert ps.templates == dict.fromkeys(["LUAD", "LUSC"], tuple(CONCH["0"]["templates"]))
    assert ps.prompts("LUSC")[1] == "a photomicrograph showing squamous cell carcinoma."
    assert to_conch_json(ps) == CONCH


def test_conch_round_trip_keeps_hash(tmp_path):
    """YAML → CONCH JSON → load: same classes, templates and hash (the hash ignores format and file name)."""
    yaml_set = load_prompt_set(PROMPTS / "brca.yaml")
    path = tmp_path / "brca.json"
    path.write_text(json.dumps(to_conch_json(yaml_set)))
    back = load_prompt_set(path)
    assert back.classes == yaml_set.classes
    assert back.templates == yaml_set.templates
    assert back.sha256 == yaml_set.sha256


def test_conch_refuses_what_it_cannot_express():
    with pytest.raises(ValueError, match="background"):
        to_conch_json(load_prompt_set(PROMPTS / "nsclc.yaml"))


def test_conch_multiple_entries(tmp_path):
    doc = {"0": CONCH["0"], "1": {**CONCH["0"], "templates": ["CLASSNAME is shown."]}}
    path = tmp_path / "multi.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="entry="):
        load_prompt_set(path)
    assert load_prompt_set(path, entry="1").templates["LUAD"] == ("CLASSNAME is shown.",)


@pytest.mark.parametrize(
    ("body", "culprit"),
    [
        ({"classnames": {}, "templates": ["CLASSNAME."]}, "classnames"),
        ({"classnames": {"A": []}, "templates": ["CLASSNAME."]}, "'A'"),
        ({"classnames": {"A": ["a"]}, "templates": ["the tissue."]}, "the tissue."),
        ({"classnames": {"A": ["a"]}, "templates": ["CLASSNAME."], "extra": 1}, "extra"),
    ],
)
def test_conch_bad(tmp_path, body, culprit):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"0": body}))
    with pytest.raises(InputError) as info:
        load_prompt_set(path)
    assert str(path) in str(info.value)
    assert culprit in str(info.value)


def test_json_duplicate_key(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"0": {"classnames": {"A": ["a"], "A": ["b"]}, "templates": ["CLASSNAME."]}}')
    with pytest.raises(InputError, match="'A' appears twice"):
        load_prompt_set(path)


def test_sha256_tracks_content_not_layout(tmp_path):
    base = load_prompt_set(write(tmp_path, GOOD))
    changed_synonym = load_prompt_set(write(tmp_path, GOOD.replace('"first class"', '"first kind"'), "b.yaml"))
    changed_template = load_prompt_set(write(tmp_path, GOOD.replace("an H&E image", "an H&E photo"), "c.yaml"))
    swapped = GOOD.replace('  bg: {synonyms: ["background tissue"]}', '  bg2: {synonyms: ["background tissue"]}')
    renamed_class = load_prompt_set(write(tmp_path, swapped, "d.yaml"))
    relaid = load_prompt_set(
        write(
            tmp_path,
            "# comment\nclasses:\n  A: {synonyms: [alpha, first class]}\n"
            '  B: {synonyms: [beta], templates: ["a photomicrograph of CLASSNAME."]}\n'
            "background: {bg: [background tissue]}\n"
            'templates: ["CLASSNAME.", "an H&E image of CLASSNAME."]\ndescription: another description\n',
            "e.yaml",
        )
    )
    digests = {base.sha256, changed_synonym.sha256, changed_template.sha256, renamed_class.sha256}
    assert len(digests) == 4
    assert relaid.sha256 == base.sha256


def test_subset_deterministic_and_sized():
    ps = load_prompt_set(PROMPTS / "nsclc.yaml")  # 8 templates, 5 / 5 / 3 synonyms
    a = ps.subset(np.random.default_rng(3), template_fraction=0.5, synonym_fraction=0.5)
    b = ps.subset(np.random.default_rng(3), template_fraction=0.5, synonym_fraction=0.5)
    assert a == b
    assert isinstance(a, PromptSet)
    assert a.all_classes == ps.all_classes
    # round(0.5 × 5) = 3 (half up), round(0.5 × 3) = 2, round(0.5 × 8) = 4
    assert [len(a.synonyms(c)) for c in a.all_classes] == [3, 3, 2]
    assert all(len(a.templates[c]) == 4 for c in a.all_classes)
    # shared templates share the draw; kept items keep file order
    assert a.templates["LUAD"] == a.templates["LUSC"] == a.templates["normal"]
    for cls in a.all_classes:
        positions = [ps.synonyms(cls).index(s) for s in a.synonyms(cls)]
        assert positions == sorted(positions)
    assert a.sha256 != ps.sha256
    full = ps.subset(np.random.default_rng(0), 1.0, 1.0)
    assert full.sha256 == ps.sha256
    tiny = ps.subset(np.random.default_rng(0), 0.01, 0.01)
    assert all(len(tiny.synonyms(c)) == 1 and len(tiny.templates[c]) == 1 for c in tiny.all_classes)
    with pytest.raises(ValueError, match="template_fraction"):
        ps.subset(np.random.default_rng(0), 0.0, 0.5)


def test_subset_per_class_templates_drawn_separately(tmp_path):
    ps = load_prompt_set(write(tmp_path, GOOD))
    sub = ps.subset(np.random.default_rng(0), 0.5, 0.5)
    assert sub.templates["B"] == ("a photomicrograph of CLASSNAME.",)
    assert len(sub.templates["A"]) == 1
    assert sub.templates["A"] == sub.templates["bg"]
