"""Workflow configuration: JSON-schema validation with defaults.

The schema (config/schemas/config.schema.yaml) is the single place where a key, its type, its default and
its meaning are written down. Unknown keys are rejected: a misspelt ``tile_size`` that silently falls back
to the default is worse than an error.

Settings objects (``TilingParams``, ``CallSettings``, ...) have no defaults of their own: each is built by
``from_config`` from the validated config, or from any part of it that keeps the config's key paths (what a
rule passes as a param): each field at its own name in the class's section, read by
:func:`settings_fields` (a :class:`SectionSettings` subclass names its section and gets ``from_config`` from
it). The seed is read the same way, as ``config["seed"]``. Library callers and tests without a config file take
:func:`default_config`, so a default is never written twice.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Self

import jsonschema
import yaml

from histoclip.errors import InputError, InputErrors

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schemas" / "config.schema.yaml"


def load_yaml(path: str | Path) -> Any:
    """Load YAML safely (no arbitrary Python objects), naming the file on a syntax error."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        raise InputError(f"is not valid YAML ({exc})", where=str(path), fix="correct the YAML syntax") from exc


def load_schema(path: str | Path = SCHEMA_PATH) -> dict[str, Any]:
    return load_yaml(path)


def fill_defaults(instance: Any, schema: Mapping[str, Any]) -> Any:
    """Return ``instance`` with schema defaults filled in, recursing into objects.

    A missing object whose schema has ``default: {}`` is created and then filled, so a config that
    omits a whole section still gets every default of that section. Nothing is validated: the preflight uses
    it to go on checking the inputs of a config that :func:`validate_config` refused.
    """
    if not isinstance(instance, dict) or schema.get("type") != "object":
        return instance
    out = dict(instance)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = fill_defaults(out[key], sub)
    return out


def _describe(error: jsonschema.ValidationError, schema: Mapping[str, Any]) -> tuple[str, str]:
    """Where (dotted key path) and a fix hint (the key's description) for a validation error."""
    path = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    node: Any = schema
    for part in error.absolute_path:
        node = node.get("properties", {}).get(str(part), {}) if isinstance(node, Mapping) else {}
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        fix = f"remove or rename it; allowed keys here are: {', '.join(allowed)}"
    else:
        description = " ".join(str(node.get("description", "")).split()) if isinstance(node, Mapping) else ""
        fix = f"set a valid value. {description}".strip()
    return path, fix


def validate_config(
    config: Mapping[str, Any], *, source: str = "config", schema: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Validate ``config`` against the schema and return a copy with every default filled in.

    ``source`` names where the config came from (file and overrides) for the error message.
    Raises :class:`InputError` listing every problem, not only the first.
    """
    schema = load_schema() if schema is None else schema
    config = dict(config)
    if isinstance(config.get("clinical"), str) and config["clinical"].strip().lower() in ("", "null", "none"):
        config["clinical"] = None  # Snakemake passes `--config clinical=null` on as the string "null"
    _require_models_set(config, source)
    filled = fill_defaults(config, schema)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        problems = []
        for error in errors:
            where, fix = _describe(error, schema)
            problems.append(InputError(f"{error.message}.", where=where, fix=fix))
        raise InputErrors("invalid configuration", problems, where=source)
    if filled["tiling"]["overlap_px"] >= filled["tiling"]["tile_px"]:
        raise InputError(
            f"tiling.overlap_px ({filled['tiling']['overlap_px']}) must be smaller than tiling.tile_px "
            f"({filled['tiling']['tile_px']})",
            where=source,
            fix="lower overlap_px",
        )
    unknown = [name for name in filled["embedding"]["models"] if name not in filled["models"]]
    if unknown:
        raise InputError(
            f"embedding.models names {unknown}, which are not defined under `models` ({sorted(filled['models'])})",
            where=source,
            fix="add them under `models:` or remove them from embedding.models",
        )
    if filled["mpp"]["min"] >= filled["mpp"]["max"]:
        raise InputError("mpp.min must be smaller than mpp.max", where=source, fix="swap or correct them")
    return filled


def _require_models_set(config: Mapping[str, Any], source: str) -> None:
    """A model entry left as config/config.yaml ships it (``model: null``) is named, with what to put there.

    The real-cohort template leaves the weights to the user on purpose (nothing demo-specific in it); without
    this, the schema would say "None is not of type 'string'", which does not tell a new user what is wanted.
    """
    models = config.get("models")
    if not isinstance(models, Mapping):
        return
    unset = [
        name
        for name, entry in models.items()
        if isinstance(entry, Mapping)
        and entry.get("backend", "open_clip") != "conch"
        and "model" in entry
        and (entry["model"] is None or str(entry["model"]).strip() == "")
    ]
    if unset:
        raise InputErrors(
            "model weights not set",
            [
                InputError(
                    "is not set: config/config.yaml leaves the model's weights for you to name",
                    where=f"models.{name}.model",
                    fix="name the model: hf-hub:org/repo (from the local Hugging Face cache, e.g. "
                    "hf-hub:wisdomik/QuiltNet-B-32), local-dir:/path/to/open_clip/folder, or an architecture with "
                    "`pretrained: /path/to/checkpoint` (README: 'Model backends and supported models')",
                )
                for name in unset
            ],
            where=source,
        )


def default_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The validated config of ``overrides`` (nested like the config file), every other key at its default.

    How library callers and tests get settings without a config file, e.g.
    ``TilingParams.from_config(default_config({"tiling": {"tile_px": 64}}))``: the values come from the schema
    and are checked against it, so no default is repeated in code.
    """
    if overrides:
        return validate_config(overrides, source="default_config()")
    return copy.deepcopy(_schema_defaults())


@functools.cache
def _schema_defaults() -> dict[str, Any]:
    """Every default of the schema, validated once per process (library calls that take defaults are frequent)."""
    return validate_config({}, source="default_config()")


def settings_fields(cls: type, config: Mapping[str, Any], section: str, **given: Any) -> dict[str, Any]:
    """The keyword arguments of the settings dataclass ``cls``: each field read at its own name in ``section``.

    ``section`` is a key path of the config (``"zeroshot"``, ``"figures.evidence"``). A field named ``seed`` is
    the workflow seed, ``config["seed"]``; ``given`` are fields read elsewhere by the caller (e.g. survival's
    ``abstain_margin``, a ``zeroshot`` key); a field with a default of its own is no config key and keeps it.
    """
    node: Any = config
    for key in section.split("."):
        node = node[key]
    values = {}
    for f in dataclasses.fields(cls):
        if f.name in given:
            values[f.name] = given[f.name]
        elif f.name == "seed":
            values[f.name] = config["seed"]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            values[f.name] = node[f.name]
    return values


class SectionSettings:
    """Base of a settings dataclass read from one config section: ``class CallSettings(SectionSettings,
    section="zeroshot")`` gets ``from_config``, each field read by :func:`settings_fields` (so none repeats it)."""

    config_section: ClassVar[str]

    def __init_subclass__(cls, *, section: str, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.config_section = section

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Self:
        """From the validated config, or any part of it that keeps the config's key paths."""
        return cls(**settings_fields(cls, config, cls.config_section))
