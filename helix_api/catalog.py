"""The models Helix offers: Mistral-7B-Instruct and SDXL by default, plus any an operator configures.

Each model has a full name (a hub id or a local path: what a runner loads) and a short name people
type and see, its alias. The catalog owns both: `resolve()` turns whatever came in into the full name,
and `shown()` turns a full name into what a user sees, so no filesystem path reaches a user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from helix_api.errors import UnknownModel, echo

TYPES = ("text", "image")

# Full name -> (type, alias).
DEFAULT_MODELS = {
    "mistralai/Mistral-7B-Instruct-v0.1": ("text", "mistral-7b-instruct"),
    "stabilityai/stable-diffusion-xl-base-1.0": ("image", "sdxl-base"),
}
# What an alias may hold: nothing a URL would escape or a shell would split, expand or glob.
ALIAS_CHARACTERS = "A-Za-z0-9._-"
_ALIAS = re.compile(f"[{ALIAS_CHARACTERS}]+")
# Names that are filesystem paths rather than hub ids (`org/name`).
_PATH_STARTS = ("/", "./", "../", "~")


class CatalogError(ValueError):
    """HELIX_MODELS cannot be served as written; the API refuses to start."""


def is_path(name: str) -> bool:
    """Whether a model's full name is a local path (absolute, ./, ../ or ~), which users must not see."""
    return name.startswith(_PATH_STARTS) or name in (".", "..")


@dataclass(frozen=True)
class ModelSpec:
    """A model sessions may name: its full name (hub id or local path), what it makes, and its alias."""

    name: str
    type: str
    alias: str | None = None

    @property
    def shown(self) -> str:
        """What users see and may type: the alias, else the hub id (a path always has an alias)."""
        return self.alias or self.name


def _implicit_alias(name: str) -> str:
    """A path configured without an alias is known by its directory's name (`/models/tiny-sdxl/` -> tiny-sdxl)."""
    base = PurePosixPath(name.rstrip("/")).name
    if not _ALIAS.fullmatch(base) or base in (".", ".."):
        raise CatalogError(f"HELIX_MODELS: the model path {name!r} needs an alias (its directory name {base!r} "
                           f"is not one): write it as TYPE:ALIAS={name} with ALIAS of [{ALIAS_CHARACTERS}]")
    return base


class Catalog:
    """The offered models, looked up by full name or alias."""

    def __init__(self, models: dict[str, tuple[str, str | None]]) -> None:
        self._models: dict[str, ModelSpec] = {}
        # Every name a model may be asked for (full name and alias) -> its full name.
        self._names: dict[str, str] = {name: name for name in models}
        for name, (type_, alias) in models.items():
            implicit = alias is None and is_path(name)
            if implicit:
                alias = _implicit_alias(name)
            if alias is not None:
                self._add_alias(name, alias, implicit=implicit)
            self._models[name] = ModelSpec(name, type_, alias)

    def _add_alias(self, name: str, alias: str, *, implicit: bool = False) -> None:
        if not _ALIAS.fullmatch(alias):
            raise CatalogError(f"HELIX_MODELS: the alias {alias!r} of {name!r} may hold only letters, digits, "
                               f"'.', '_' and '-' ([{ALIAS_CHARACTERS}]): a URL or a shell would mangle the rest")
        taken = self._names.get(alias)
        if taken is not None and taken != name:
            what = "the name" if alias == taken else "the alias"
            mine = "alias (its directory's name)" if implicit else "alias"
            raise CatalogError(f"HELIX_MODELS: the {mine} {alias!r} of {name!r} clashes with {what} of "
                               f"{taken!r}: give one of them another alias (TYPE:ALIAS=NAME)")
        self._names[alias] = name

    @classmethod
    def from_setting(cls, extra: str) -> Catalog:
        """Defaults plus `TYPE:NAME` or `TYPE:ALIAS=NAME` entries separated by commas (NAME is a hub id or a path).

        An entry for a default model with an alias replaces the default's alias; one without keeps it.
        """
        models = dict(DEFAULT_MODELS)
        for entry in filter(None, (part.strip() for part in extra.split(","))):
            type_, sep, rest = entry.partition(":")
            alias, eq, name = rest.partition("=")
            if not eq:
                alias, name = "", rest
            alias, name = alias.strip(), name.strip()
            if not sep or type_ not in TYPES or not name or (eq and not alias):
                raise CatalogError(f"HELIX_MODELS entry {entry!r} is not TYPE:NAME or TYPE:ALIAS=NAME "
                                   f"with TYPE one of {TYPES}")
            if not alias and name in models:
                alias = models[name][1] or ""
            models[name] = (type_, alias or None)
        return cls(models)

    def resolve(self, name: str) -> str:
        """The full name of the model called `name` (its full name or alias); an unknown name as it came,
        for the caller to refuse or to match against what runners serve."""
        return self._names.get(name, name)

    def shown(self, name: str) -> str:
        """What a user sees for the model whose full name is `name`: its alias where it has one.

        A path the catalog does not know (a runner serving a directory nobody configured) shows as its
        directory's name, never as the path.
        """
        spec = self._models.get(name)
        if spec is not None:
            return spec.shown
        return PurePosixPath(name.rstrip("/")).name or name if is_path(name) else name

    def find(self, name: str) -> ModelSpec | None:
        """The model called `name` (full name or alias), or None."""
        return self._models.get(self.resolve(name))

    def specs(self) -> list[ModelSpec]:
        """Every offered model, by full name."""
        return sorted(self._models.values(), key=lambda s: s.name)

    def names(self, type_: str | None = None) -> list[str]:
        """The names users see (aliases where there are, of one type if given), sorted."""
        return sorted(s.shown for s in self._models.values() if type_ is None or s.type == type_)

    def get(self, name: str, type_: str) -> ModelSpec:
        """The model called `name` (full name or alias), checked to be of `type_`."""
        spec = self.find(name)
        if spec is None or spec.type != type_:
            raise UnknownModel(f"Unknown {type_} model {echo(name)}; offered: {', '.join(self.names(type_))}",
                               field="model_name")
        return spec

    def as_list(self) -> list[dict[str, str | None]]:
        """The catalogue as JSON: each model by the name users see, with its hub id (null for a local path)."""
        return [{"name": s.shown, "type": s.type, "alias": s.alias, "full_name": None if is_path(s.name) else s.name}
                for s in sorted(self._models.values(), key=lambda s: s.shown)]
