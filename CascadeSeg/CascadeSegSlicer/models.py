"""Models the panel offers: installed and bundled packages first, then the catalog."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .i18n import tr as _


@dataclass(frozen=True)
class ModelChoice:
    name: str
    version: str
    source: str              # "installed", "bundled" or "catalog" (needs Install first)
    description: str = ""
    labels: tuple[str, ...] = ()
    license: str = ""
    path: Path | None = None

    @property
    def installed(self) -> bool:
        return self.source != "catalog"

    def title(self) -> str:
        suffix = "" if self.installed else " " + _("(not installed)")
        return f"{self.name} {self.version}{suffix}"

    def info(self) -> str:
        """The info line under the model selector: labels, version, licence."""
        labels = ", ".join(self.labels) if self.labels else _("unknown labels")
        lic = self.license or _("licence not stated")
        return _("{count} labels: {labels} | version {version} | {licence} | {source}").format(
            count=len(self.labels), labels=labels, version=self.version, licence=lic, source=self.source)


def list_models() -> list[ModelChoice]:
    """Installed (user folder, then bundled) models, then catalog entries not installed."""
    from CascadeSegLib.packaging import catalog

    choices: list[ModelChoice] = []
    for m in catalog.installed_models():
        lic = ""
        try:
            lic = str(catalog.read_model_json(m.path).get("license", ""))
        except Exception:  # noqa: BLE001 - a broken package still shows up, without licence
            pass
        if any(c.name == m.name for c in choices):
            continue  # user-installed copy shadows the bundled one, like find_model
        choices.append(ModelChoice(m.name, m.version, m.source, m.description, tuple(m.labels), lic, m.path))
    try:
        cat = catalog.load_catalog()
    except Exception:  # noqa: BLE001 - no or broken catalog: installed models still work
        cat = []
    for e in cat:
        if not any(c.name == e.name for c in choices):
            choices.append(ModelChoice(e.name, e.version, "catalog", e.description, tuple(e.labels), e.license))
    return choices
