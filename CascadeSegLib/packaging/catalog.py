"""The model catalog (`Resources/Models.json`) and the models installed on this machine.

The catalog is what `cascadeseg models install NAME` can fetch; it is checked against
`Resources/Models.schema.json` by the small validator below (jsonschema is not a dependency)
so that a typo in the catalog fails with the JSON path of the problem, not a KeyError later.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..resources import bundled_models_dir, models_dir, resources_dir

log = logging.getLogger(__name__)

CATALOG_FORMAT_VERSION = 1


@dataclass(frozen=True)
class CatalogEntry:
    """One downloadable (or bundled) model as the catalog describes it."""

    name: str
    version: str
    description: str
    labels: tuple[str, ...]
    license: str
    url: str | None
    sha256: str | None
    size_bytes: int | None
    bundled: bool

    @staticmethod
    def from_json(d: dict[str, Any]) -> CatalogEntry:
        return CatalogEntry(name=d["name"], version=d["version"], description=d["description"],
                            labels=tuple(d["labels"]), license=d["license"], url=d["url"],
                            sha256=d["sha256"], size_bytes=d["size_bytes"], bundled=d["bundled"])

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "description": self.description,
                "labels": list(self.labels), "license": self.license, "url": self.url,
                "sha256": self.sha256, "size_bytes": self.size_bytes, "bundled": self.bundled}


@dataclass(frozen=True)
class Catalog:
    entries: tuple[CatalogEntry, ...]
    path: Path | None = None

    def __iter__(self) -> Iterator[CatalogEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return any(e.name == name for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def get(self, name: str) -> CatalogEntry:
        """The entry called `name`; ModelError listing the known names otherwise."""
        for e in self.entries:
            if e.name == name:
                return e
        known = ", ".join(self.names) or "none"
        raise ModelError(f"model {name!r} is not in the catalog (known: {known}); give a "
                         "model name from `cascadeseg models list`, a URL or a .zip path")


@dataclass(frozen=True)
class InstalledModel:
    """A model folder found on disk (its model.json read, its weights not yet checked)."""

    name: str
    version: str
    path: Path
    source: str                      # "installed" (models_dir) or "bundled" (Resources/Models)
    labels: tuple[str, ...] = ()
    description: str = ""


# --------------------------------------------------------------------------- validation

_SUPPORTED_KEYWORDS = {"$schema", "$id", "title", "description", "type", "required",
                       "properties", "additionalProperties", "items", "pattern", "enum", "const",
                       "minimum", "minLength", "minItems", "uniqueItems"}
_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                          "null": type(None), "number": (int, float), "integer": int}


def _type_ok(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def _loc(path: str) -> str:
    return path or "(top level)"


def validate(instance: Any, schema: dict[str, Any], path: str = "") -> None:
    """Check `instance` against the JSON-Schema subset used by Models.schema.json.

    Raises ValueError("<json path>: <what is wrong>") at the first problem found.
    """
    unknown = set(schema) - _SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema at {_loc(path)} uses unsupported keywords {sorted(unknown)}")
    if "const" in schema and instance != schema["const"]:
        raise ValueError(f"{_loc(path)}: must be {schema['const']!r}, got {instance!r}")
    if "enum" in schema and instance not in schema["enum"]:
        raise ValueError(f"{_loc(path)}: must be one of {schema['enum']}, got {instance!r}")
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_ok(instance, t) for t in types):
            raise ValueError(f"{_loc(path)}: must be {' or '.join(types)}, "
                             f"got {type(instance).__name__} {instance!r}"[:200])
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                raise ValueError(f"{_loc(path)}: missing required key {key!r}")
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is False:
            extra = sorted(set(instance) - set(props))
            if extra:
                raise ValueError(f"{_loc(path)}: unknown key(s) {extra} (allowed: "
                                 f"{sorted(props)})")
        for key, sub in props.items():
            if key in instance:
                validate(instance[key], sub, f"{path}.{key}" if path else key)
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            raise ValueError(f"{_loc(path)}: needs at least {schema['minItems']} item(s)")
        if schema.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in instance}
                                             ) != len(instance):
            raise ValueError(f"{_loc(path)}: items must be unique")
        if "items" in schema:
            for i, item in enumerate(instance):
                validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            raise ValueError(f"{_loc(path)}: must not be empty")
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            raise ValueError(f"{_loc(path)}: {instance!r} does not match {schema['pattern']}")
    if _type_ok(instance, "number") and "minimum" in schema and instance < schema["minimum"]:
        raise ValueError(f"{_loc(path)}: must be >= {schema['minimum']}, got {instance}")


@lru_cache(maxsize=4)
def _schema(path: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def catalog_schema() -> dict[str, Any]:
    return _schema(str(resources_dir() / "Models.schema.json"))


def parse_catalog(data: Any, source: str = "Models.json") -> Catalog:
    """Validate catalog JSON (already parsed) and build the Catalog; ModelError on problems."""
    try:
        validate(data, catalog_schema())
    except ValueError as exc:
        raise ModelError(f"{source}: {exc}") from None
    entries = tuple(CatalogEntry.from_json(d) for d in data["models"])
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e.name in seen:
            raise ModelError(f"{source}: models[{i}].name: {e.name!r} is listed twice; names "
                             "must be unique")
        seen.add(e.name)
        if not e.bundled and (e.url is None or e.sha256 is None):
            raise ModelError(f"{source}: models[{i}] ({e.name}): a model that is not bundled "
                             "needs a url and a sha256")
    return Catalog(entries)


def load_catalog(path: str | os.PathLike | None = None) -> Catalog:
    """Read and validate a catalog file (default: Resources/Models.json)."""
    p = Path(path) if path is not None else resources_dir() / "Models.json"
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model catalog {p} does not exist; reinstall CascadeSeg or pass the "
                         "catalog path") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model catalog {p} is not valid JSON (line {exc.lineno}: {exc.msg})"
                         ) from None
    cat = parse_catalog(data, str(p))
    return Catalog(cat.entries, p)


# --------------------------------------------------------------------------- installed models

def read_model_json(folder: Path) -> dict[str, Any]:
    """model.json of a package folder, as a dict (ModelError if missing or not JSON)."""
    f = folder / "model.json"
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{folder} has no model.json; it is not a model package") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"{f} is not valid JSON ({exc}); reinstall the model") from None
    if not isinstance(data, dict):
        raise ModelError(f"{f} must hold a JSON object; reinstall the model")
    return data


def _scan(folder: Path, source: str) -> list[InstalledModel]:
    found: list[InstalledModel] = []
    if not folder.is_dir():
        return found
    for sub in sorted(folder.iterdir()):
        if sub.name.startswith(".") or not sub.is_dir() or not (sub / "model.json").is_file():
            continue
        try:
            data = read_model_json(sub)
            labels = tuple(str(lab["name"]) if isinstance(lab, dict) else str(lab)
                           for lab in data.get("labels", []))
            found.append(InstalledModel(name=str(data.get("name", sub.name)),
                                        version=str(data.get("version", "?")), path=sub,
                                        source=source, labels=labels,
                                        description=str(data.get("description", ""))))
        except (ModelError, KeyError, TypeError) as exc:
            log.warning("skipping %s: %s", sub, exc)
    return found


def installed_models(models_root: str | os.PathLike | None = None,
                     bundled_root: str | os.PathLike | None = None) -> list[InstalledModel]:
    """Model folders (with a model.json) in models_dir() and then bundled_models_dir()."""
    mroot = Path(models_root) if models_root is not None else models_dir()
    broot = Path(bundled_root) if bundled_root is not None else bundled_models_dir()
    return _scan(mroot, "installed") + _scan(broot, "bundled")
