"""Prompt sets: the class names, synonyms and caption templates a zero-shot text classifier is built from.

Why a file per task: zero-shot accuracy depends heavily on the wording of the prompts (MI-Zero reports
0.41–0.92 balanced accuracy across prompt sets on one task), so prompts are data under version control,
hashed into every output that depends on them, and subsampled to report how sensitive a result is to them.

Two formats are read; which one is decided by the content, not the file suffix.

**histoclip YAML** (``config/prompts/*.yaml``; the same structure as JSON is accepted too)::

    description: NSCLC subtyping, LUAD vs LUSC        # optional, free text (not part of the hash)
    templates:                                        # default templates; each contains CLASSNAME
      - "CLASSNAME."
      - "an H&E image of CLASSNAME."
    classes:                                          # called classes, in output order (at least 1)
      LUAD:
        synonyms: ["lung adenocarcinoma", "adenocarcinoma of the lung"]
        templates: ["..."]                            # optional per-class override of the templates
      LUSC: ["squamous cell carcinoma", "..."]        # shorthand: a list is the synonyms
    background:                                       # optional: scored (tile scores, heatmaps) but
      normal: {synonyms: ["normal lung parenchyma"]}  # never called for a slide

Top-level keys are ``description``, ``templates``, ``classes`` and ``background``; a class entry has
``synonyms`` and ``templates``. Anything else is an error rather than silently ignored, because a misspelt
key (``synonym:``) would otherwise change the classifier without anyone noticing. The top-level
``templates`` may be left out only when every class has its own. Two or more called classes are needed
to call slides; one is enough for tile scores and heatmaps.

**CONCH / MI-Zero JSON** (``prompts/*.json`` in mahmoodlab/CONCH)::

    {"0": {"classnames": {"LUAD": ["adenocarcinoma", ...], "LUSC": [...]},
           "templates": ["CLASSNAME.", "a photomicrograph showing CLASSNAME.", ...]}}

The outer keys index alternative prompt sets; a file with more than one needs ``entry=`` to pick one. All
classes are called, none is background, and all share the templates.

Rules checked for both formats (each failure is an :class:`~histoclip.errors.InputError` naming the file
and the class or template): at least one class; no class listed twice (also not in both ``classes`` and
``background``, and not as a duplicate YAML/JSON key, which parsers would otherwise silently merge);
non-empty synonym and template lists of non-empty strings; every template contains ``CLASSNAME``; no
synonym or template listed twice within a class; no synonym shared by two classes (the classes would share
a prompt and be pulled together).

The ``sha256`` of a prompt set is taken over its canonical content — class order, synonyms, the templates
each class uses, which classes are background — and not over the file name, description, format or
layout, so a cached text classifier is reused exactly when the prompts are the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from histoclip.errors import InputError

__all__ = ["PLACEHOLDER", "PromptSet", "load_prompt_set", "to_conch_json"]

#: The placeholder a template marks the class name with (the CONCH convention).
PLACEHOLDER = "CLASSNAME"

_TOP_KEYS = ("description", "templates", "classes", "background")
_CLASS_KEYS = ("synonyms", "templates")
_CONCH_KEYS = ("classnames", "templates")
_HASH_VERSION = "histoclip-prompt-set-v1"


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt set: what a text classifier is built from.

    ``classes`` and ``background`` keep the file's order, which is the row order of the classifier weights
    and the column order of every score and probability table, so outputs are stable across runs.
    """

    name: str
    classes: dict[str, tuple[str, ...]]
    background: dict[str, tuple[str, ...]]
    templates: dict[str, tuple[str, ...]]
    sha256: str
    description: str = ""

    @classmethod
    def hashed(
        cls,
        name: str,
        classes: dict[str, tuple[str, ...]],
        background: dict[str, tuple[str, ...]],
        templates: dict[str, tuple[str, ...]],
        description: str,
    ) -> PromptSet:
        """The prompt set of this content, its ``sha256`` computed from it (what determines the classifier)."""
        return cls(name, classes, background, templates, _content_sha256(classes, background, templates), description)

    @property
    def all_classes(self) -> list[str]:
        """Called classes first, then background classes: the classifier's row order."""
        return [*self.classes, *self.background]

    @property
    def called_classes(self) -> list[str]:
        """The classes a slide can be called as: the probability columns, in file order."""
        return list(self.classes)

    def synonyms(self, cls: str) -> tuple[str, ...]:
        """Synonyms of a called or background class (KeyError naming the set's classes otherwise)."""
        if cls in self.classes:
            return self.classes[cls]
        if cls in self.background:
            return self.background[cls]
        raise KeyError(f"class {cls!r} is not in prompt set {self.name!r} (classes: {self.all_classes})")

    def prompts(self, cls: str) -> list[str]:
        """Every synonym × template of ``cls`` with the placeholder replaced, synonym-major."""
        return [
            template.replace(PLACEHOLDER, synonym) for synonym in self.synonyms(cls) for template in self.templates[cls]
        ]

    def subset(self, rng: np.random.Generator, template_fraction: float, synonym_fraction: float) -> PromptSet:
        """A random sub-prompt-set, for measuring how much a result depends on the wording.

        Each class keeps ``round(synonym_fraction × n)`` of its synonyms (at least one), drawn independently
        per class. Templates are drawn once per distinct template list, so classes that share the default
        templates also share the drawn subset (the comparison between classes stays like for like), and a
        class with its own templates gets its own draw. Kept items stay in file order.
        """
        for label, fraction in (("template_fraction", template_fraction), ("synonym_fraction", synonym_fraction)):
            if not 0.0 < fraction <= 1.0:
                raise ValueError(f"{label} must be in (0, 1], got {fraction}")

        def draw(items: tuple[str, ...], fraction: float) -> tuple[str, ...]:
            keep = max(1, math.floor(fraction * len(items) + 0.5))
            chosen = np.sort(rng.choice(len(items), size=min(keep, len(items)), replace=False))
            return tuple(items[i] for i in chosen)

        drawn_templates: dict[tuple[str, ...], tuple[str, ...]] = {}
        templates: dict[str, tuple[str, ...]] = {}
        for cls in self.all_classes:
            own = self.templates[cls]
            if own not in drawn_templates:
                drawn_templates[own] = draw(own, template_fraction)
            templates[cls] = drawn_templates[own]
        classes = {cls: draw(syns, synonym_fraction) for cls, syns in self.classes.items()}
        background = {cls: draw(syns, synonym_fraction) for cls, syns in self.background.items()}
        return PromptSet.hashed(self.name, classes, background, templates, self.description)


def _content_sha256(
    classes: Mapping[str, Sequence[str]],
    background: Mapping[str, Sequence[str]],
    templates: Mapping[str, Sequence[str]],
) -> str:
    """Hash of what determines the classifier; lists (not dicts) so order counts, as it does for the rows."""
    canonical = {
        "version": _HASH_VERSION,
        "placeholder": PLACEHOLDER,
        "classes": [[cls, list(syns), list(templates[cls])] for cls, syns in classes.items()],
        "background": [[cls, list(syns), list(templates[cls])] for cls, syns in background.items()],
    }
    text = json.dumps(canonical, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------
# Parsing


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one without a word)."""


def _construct_unique_mapping(loader: _UniqueKeySafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            continue  # the base constructor reports unhashable keys itself
        if key in seen:
            first = seen[key].start_mark.line + 1
            raise _DuplicateKey(key, first, key_node.start_mark.line + 1)
        seen[key] = key_node
    return loader.construct_mapping(node, deep=deep)


_UniqueKeySafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first_line: int | None, second_line: int | None) -> None:
        self.key, self.first_line, self.second_line = key, first_line, second_line
        super().__init__(key)


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key, None, None)
        out[key] = value
    return out


def _read_document(path: Path) -> Any:
    where = str(path)
    suffix = path.suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise InputError(
            f"a prompt set must be a .yaml, .yml or .json file, not {path.name!r}",
            where=where,
            fix="write the prompt set in the YAML format of config/prompts/ or as a CONCH-style JSON file",
        )
    if not path.is_file():
        raise InputError("prompt set file does not exist", where=where, fix="check the path in the config")
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".json":
            return json.loads(text, object_pairs_hook=_json_pairs)
        return yaml.load(text, Loader=_UniqueKeySafeLoader)  # a SafeLoader subclass: as safe as yaml.safe_load
    except _DuplicateKey as dup:
        lines = f" (lines {dup.first_line} and {dup.second_line})" if dup.first_line else ""
        raise InputError(
            f"key {dup.key!r} appears twice in one mapping{lines}; a parser would silently keep only the last",
            where=where,
            fix=f"list {dup.key!r} once (merge its synonyms into one entry)",
        ) from None
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        kind = "JSON" if suffix == ".json" else "YAML"
        raise InputError(f"not valid {kind}: {exc}", where=where, fix=f"fix the {kind} syntax") from exc


def _string_list(value: Any, *, where: str, what: str, fix: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list):
        raise InputError(f"{what} must be a list of strings, got {type(value).__name__}", where=where, fix=fix)
    if not value:
        raise InputError(f"{what} is empty", where=where, fix=fix)
    items: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise InputError(f"{what} contains {item!r}, which is not a non-empty string", where=where, fix=fix)
        if item in items:
            raise InputError(f"{what} lists {item!r} twice", where=where, fix=f"remove the second {item!r}")
        items.append(item)
    return tuple(items)


def _templates(value: Any, *, where: str) -> tuple[str, ...]:
    templates = _string_list(
        value, where=where, what="templates", fix=f"give a list of caption templates, each containing {PLACEHOLDER}"
    )
    for template in templates:
        if PLACEHOLDER not in template:
            raise InputError(
                f"template {template!r} has no {PLACEHOLDER} placeholder, so every class would get the same prompt",
                where=where,
                fix=f"put {PLACEHOLDER} where the class name goes, e.g. {'an H&E image of ' + PLACEHOLDER + '.'!r}",
            )
    return templates


def _check_class_name(name: Any, *, where: str) -> str:
    if not isinstance(name, str) or not name.strip() or name != name.strip() or any(c in name for c in "\t\n\r"):
        raise InputError(
            f"class name {name!r} must be a non-empty string without surrounding spaces, tabs or newlines",
            where=where,
            fix="rename the class (it becomes a column name, p_<class>, in calls.tsv)",
        )
    return name


def _check_keys(mapping: Mapping[str, Any], allowed: tuple[str, ...], *, what: str, where: str, fix: str) -> None:
    """Refuse keys of ``mapping`` outside ``allowed``: ``"{what} [keys]; allowed: [...]"``."""
    unknown = [k for k in mapping if k not in allowed]
    if unknown:
        raise InputError(f"{what} {unknown}; allowed: {list(allowed)}", where=where, fix=fix)


def _parse_histoclip(doc: Mapping[str, Any], where: str) -> tuple[dict, dict, dict, str]:
    _check_keys(
        doc,
        _TOP_KEYS,
        what="unknown top-level key(s)",
        where=where,
        fix="remove or rename them (class entries go under `classes:` or `background:`)",
    )
    description = doc.get("description") or ""
    if not isinstance(description, str):
        raise InputError("description must be a string", where=f"{where}: description")
    default_templates = _templates(doc["templates"], where=f"{where}: templates") if "templates" in doc else None

    classes: dict[str, tuple[str, ...]] = {}
    background: dict[str, tuple[str, ...]] = {}
    templates: dict[str, tuple[str, ...]] = {}
    for section, target in (("classes", classes), ("background", background)):
        for name, entry in _section_entries(doc, section, where).items():
            at = f"{where}: {section}.{name}"
            name = _check_class_name(name, where=at)
            if name in classes or name in background:
                raise InputError(
                    f"class {name!r} is listed in both `classes:` and `background:`",
                    where=at,
                    fix="keep it in one section: `classes` are called for slides, `background` is only scored",
                )
            target[name], templates[name] = _parse_class_entry(name, entry, at, default_templates)
    return classes, background, templates, description


def _section_entries(doc: Mapping[str, Any], section: str, where: str) -> Mapping[str, Any]:
    """The class entries of ``classes:`` or ``background:`` (none for an absent background); an error for a
    section that is no mapping, and for absent or empty ``classes:``."""
    entries = doc.get(section)
    if entries is None:
        if section == "classes":
            raise InputError(
                "no `classes:` section: a prompt set needs at least one called class",
                where=where,
                fix="add `classes:` with one entry per class, each with `synonyms:`",
            )
        return {}
    if not isinstance(entries, dict):
        raise InputError(
            f"`{section}:` must map class names to entries, got {type(entries).__name__}",
            where=f"{where}: {section}",
            fix="write `CLASS: {synonyms: [...]}` per class",
        )
    if section == "classes" and not entries:
        raise InputError(
            "`classes:` is empty: a prompt set needs at least one called class",
            where=f"{where}: classes",
            fix="add one entry per class, each with `synonyms:`",
        )
    return entries


def _parse_class_entry(
    name: str, entry: Any, at: str, default_templates: tuple[str, ...] | None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Synonyms and templates of one class entry (a list of synonyms, or a mapping with ``synonyms:`` and
    optionally its own ``templates:``; without them the top-level templates)."""
    if isinstance(entry, list):
        entry = {"synonyms": entry}
    if not isinstance(entry, dict):
        raise InputError(
            f"class {name!r} must be a list of synonyms or a mapping with `synonyms:`",
            where=at,
            fix="write `synonyms: [...]` under the class",
        )
    _check_keys(entry, _CLASS_KEYS, what=f"class {name!r} has unknown key(s)", where=at, fix="rename or remove them")
    if "synonyms" not in entry:
        raise InputError(f"class {name!r} has no synonyms", where=at, fix="add `synonyms: [...]`")
    synonyms = _string_list(
        entry["synonyms"],
        where=at,
        what=f"synonyms of class {name!r}",
        fix=f"list one or more names for class {name!r}",
    )
    if "templates" in entry:
        return synonyms, _templates(entry["templates"], where=f"{at}.templates")
    if default_templates is not None:
        return synonyms, default_templates
    raise InputError(
        f"class {name!r} has no templates and there are no top-level `templates:`",
        where=at,
        fix="add top-level `templates:` or `templates:` under the class",
    )


def _parse_conch(doc: Mapping[str, Any], where: str, entry: str | None) -> tuple[dict, dict, dict, str]:
    keys = list(doc)
    if entry is None:
        if len(keys) != 1:
            raise InputError(
                f"the CONCH-style file holds {len(keys)} prompt sets ({keys}); which one is meant is ambiguous",
                where=where,
                fix="pass entry=<key> (e.g. '0'), or keep one set per file",
            )
        entry = keys[0]
    if entry not in doc:
        raise InputError(f"no prompt set {entry!r} in the file (has {keys})", where=where, fix="pick an existing key")
    at = f"{where}: [{entry!r}]"
    body = doc[entry]
    if not isinstance(body, dict):
        raise InputError("a CONCH prompt set must be an object with classnames and templates", where=at)
    unknown = [k for k in body if k not in _CONCH_KEYS]
    if unknown:
        raise InputError(
            f"unknown key(s) {unknown}; a CONCH prompt set has {list(_CONCH_KEYS)}", where=at, fix="remove them"
        )
    if "templates" not in body:
        raise InputError("no `templates`", where=at, fix=f"add a list of templates containing {PLACEHOLDER}")
    templates = _templates(body["templates"], where=f"{at}.templates")
    names = body.get("classnames")
    if not isinstance(names, dict) or not names:
        raise InputError(
            "no classes: `classnames` must map each class to its synonyms",
            where=f"{at}.classnames",
            fix='write {"CLASS": ["synonym", ...], ...}',
        )
    classes: dict[str, tuple[str, ...]] = {}
    for name, synonyms in names.items():
        cls_at = f"{at}.classnames.{name}"
        name = _check_class_name(name, where=cls_at)
        classes[name] = _string_list(
            synonyms, where=cls_at, what=f"synonyms of class {name!r}", fix=f"list one or more names for {name!r}"
        )
    return classes, {}, dict.fromkeys(classes, templates), ""


def _check_shared_synonyms(
    classes: Mapping[str, tuple[str, ...]], background: Mapping[str, tuple[str, ...]], where: str
):
    owner: dict[str, str] = {}
    for name, synonyms in [*classes.items(), *background.items()]:
        for synonym in synonyms:
            if synonym in owner:
                raise InputError(
                    f"synonym {synonym!r} is listed for both class {owner[synonym]!r} and class {name!r}",
                    where=where,
                    fix="give each class its own names; a shared prompt cannot tell the classes apart",
                )
            owner[synonym] = name


def load_prompt_set(path: str | Path, *, entry: str | None = None) -> PromptSet:
    """Read and validate a prompt set (histoclip YAML/JSON or CONCH-style JSON); ``name`` is the file stem.

    ``entry`` picks one set out of a CONCH file that holds several (keys ``"0"``, ``"1"``, ...).
    """
    path = Path(path)
    where = str(path)
    doc = _read_document(path)
    if not isinstance(doc, dict) or not doc:
        raise InputError(
            "the file does not hold a prompt set (expected a mapping with `classes:`)",
            where=where,
            fix="see the format in the docstring of histoclip.zeroshot.prompts or any file in config/prompts/",
        )
    is_conch = "classes" not in doc and all(isinstance(v, dict) and "classnames" in v for v in doc.values())
    if is_conch:
        classes, background, templates, description = _parse_conch(doc, where, entry)
    else:
        if entry is not None:
            raise InputError("entry= only applies to CONCH-style files with several prompt sets", where=where)
        classes, background, templates, description = _parse_histoclip(doc, where)
    _check_shared_synonyms(classes, background, where)
    return PromptSet.hashed(path.stem, classes, background, templates, description)


def to_conch_json(prompt_set: PromptSet) -> dict[str, Any]:
    """The prompt set in CONCH's JSON layout, for sharing with CONCH/MI-Zero code.

    CONCH's format has neither background classes nor per-class templates, so a set that uses either is
    refused rather than written with something silently lost.
    """
    if prompt_set.background:
        raise ValueError(
            f"prompt set {prompt_set.name!r} has background classes {list(prompt_set.background)}, "
            "which the CONCH format cannot express"
        )
    distinct = {prompt_set.templates[cls] for cls in prompt_set.classes}
    if len(distinct) != 1:
        raise ValueError(
            f"prompt set {prompt_set.name!r} has per-class templates, which the CONCH format cannot express"
        )
    return {
        "0": {
            "classnames": {cls: list(syns) for cls, syns in prompt_set.classes.items()},
            "templates": list(distinct.pop()),
        }
    }


def query_slug(query: str) -> str:
    """A file-name stem for a query: lower case, runs of other characters as '-' ("Tumour necrosis" →
    "tumour-necrosis")."""
    slug = re.sub(r"[^a-z0-9]+", "-", query.lower()).strip("-")
    if not slug:
        raise InputError(
            f"query {query!r} has no letters or digits to name its gallery file by",
            where="config retrieval.queries",
            fix="write the query in words",
        )
    return slug


def query_slugs(queries: Sequence[str]) -> list[str]:
    """Slugs of all queries; two queries with the same slug would overwrite each other's gallery: an error."""
    slugs = [query_slug(q) for q in queries]
    seen: dict[str, str] = {}
    for query, slug in zip(queries, slugs, strict=True):
        if slug in seen:
            raise InputError(
                f"queries {seen[slug]!r} and {query!r} both name the gallery file {slug!r}",
                where="config retrieval.queries",
                fix="remove the duplicate or reword one of them",
            )
        seen[slug] = query
    return slugs
