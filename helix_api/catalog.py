"""The models Helix offers: Mistral-7B-Instruct and SDXL by default, plus any an operator configures."""

from __future__ import annotations

from dataclasses import dataclass

from helix_api.errors import InvalidField, UnknownModel

TYPES = ("text", "image")

DEFAULT_MODELS = {
    "mistralai/Mistral-7B-Instruct-v0.1": "text",
    "stabilityai/stable-diffusion-xl-base-1.0": "image",
}


@dataclass(frozen=True)
class ModelSpec:
    """A model sessions may name: a hub id or a local path, and whether it makes text or images."""

    name: str
    type: str


class Catalog:
    """The offered models, looked up by name."""

    def __init__(self, models: dict[str, str]) -> None:
        self._models = {name: ModelSpec(name, type_) for name, type_ in models.items()}

    @classmethod
    def from_setting(cls, extra: str) -> Catalog:
        """Defaults plus `TYPE:NAME` entries separated by commas (NAME is a hub id or a path)."""
        models = dict(DEFAULT_MODELS)
        for entry in filter(None, (part.strip() for part in extra.split(","))):
            type_, sep, name = entry.partition(":")
            if not sep or type_ not in TYPES or not name:
                raise InvalidField(f"HELIX_MODELS entry {entry!r} is not TYPE:NAME with TYPE one of {TYPES}")
            models[name] = type_
        return cls(models)

    def names(self, type_: str | None = None) -> list[str]:
        """The model names (of one type, if given), sorted."""
        return sorted(n for n, s in self._models.items() if type_ is None or s.type == type_)

    def get(self, name: str, type_: str) -> ModelSpec:
        """The model called `name`, checked to be of `type_`."""
        spec = self._models.get(name)
        if spec is None or spec.type != type_:
            raise UnknownModel(f"Unknown {type_} model {name!r}; offered: {', '.join(self.names(type_))}",
                               field="model_name")
        return spec

    def as_list(self) -> list[dict[str, str]]:
        """The catalogue as JSON."""
        return [{"name": s.name, "type": s.type} for s in sorted(self._models.values(), key=lambda s: s.name)]
