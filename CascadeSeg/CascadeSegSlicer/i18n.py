"""`tr`: Slicer's translation function for the panel's strings, or the text itself without it.

Use as Slicer's own modules do, `from .i18n import tr as _`, with placeholders filled after
translation: `_("Installing {source}...").format(source=source)` (Qt's lupdate finds `_("...")`;
an f-string could not be translated). `slicer.i18n.tr` takes its translation context from the
calling file (e.g. `CascadeSegSlicer.widget`), so it is re-exported as is, never wrapped;
`translate(context, text)` is for strings Slicer itself translates (a module category).
"""

try:  # Slicer >= 5.4 (the translation infrastructure)
    from slicer.i18n import tr, translate
except ImportError:  # slicer-core or an older Slicer: untranslated

    def tr(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text


__all__ = ["tr", "translate"]
