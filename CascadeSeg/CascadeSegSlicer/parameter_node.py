"""The module's parameter node: what the panel shows, kept in the scene (and saved with it).

Declared as Slicer modules do since 5.2, a class of annotated fields given to
`slicer.parameterNodeWrapper`. Where that is missing (slicer-core, without the app), the
same declaration is served by `_ScriptedNodeWrapper`, which writes the same parameters
the same way (str as is, bool as "True"/"False", a node as a node reference of that name),
so a scene saved by either reads back in the other.
"""

# No `from __future__ import annotations`: parameterNodeWrapper reads real types, and the
# module must import on Slicer 5.6's Python 3.9.
import typing

import slicer

from CascadeSegLib.resources import DEFAULT_MODEL

from .parameters import DEVICES, SegmentParameters

#: the module name: the parameter node's singleton tag and module name, as Slicer's own logic sets them
MODULE_NAME = "CascadeSeg"

try:  # Slicer >= 5.2
    from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
except ImportError:  # slicer-core
    parameterNodeWrapper = None

    class Choice:  # type: ignore[no-redef]
        """Stand-in for slicer.parameterNodeWrapper.Choice: the allowed values of a field."""

        def __init__(self, choices: typing.Sequence[str]) -> None:
            self.choices = tuple(choices)

        def validate(self, value: str) -> None:
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {self.choices}")


class CascadeSegParameters:
    """The panel's values. Node fields are node references; the rest are text parameters."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = DEFAULT_MODEL
    device: typing.Annotated[str, Choice(DEVICES)] = "auto"
    overlap: bool = False
    stage1Only: bool = False
    keepProbabilities: bool = False
    keepCandidates: bool = False
    refine: bool = False


class _ScriptedNodeWrapper:
    """The fields of a declaration as attributes read from and written to a vtkMRMLScriptedModuleNode."""

    _fields: dict[str, tuple[type, typing.Any, typing.Any]] = {}

    def __init__(self, parameterNode: typing.Any) -> None:
        object.__setattr__(self, "parameterNode", parameterNode)
        for name, (_, default, _validator) in self._fields.items():
            if not parameterNode.HasParameter(name):
                setattr(self, name, default)

    def __getattr__(self, name: str) -> typing.Any:
        if name not in self._fields:
            raise AttributeError(name)
        kind = self._fields[name][0]
        node = self.parameterNode
        if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
            return node.GetNodeReference(name)
        text = node.GetParameter(name)
        return text == "True" if kind is bool else kind(text)

    def __setattr__(self, name: str, value: typing.Any) -> None:
        if name not in self._fields:
            raise AttributeError(f"{type(self).__name__} has no parameter {name!r}")
        kind, _, validator = self._fields[name]
        node = self.parameterNode
        if isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            return
        if not isinstance(value, kind):
            raise TypeError(f"{name} must be {kind.__name__}, got {value!r}")
        if validator is not None:
            validator.validate(value)
        node.SetParameter(name, ("True" if value else "False") if kind is bool else str(value))


def _wrap(declaration: type) -> type:
    if parameterNodeWrapper is not None:
        return parameterNodeWrapper(declaration)  # type: ignore[no-any-return]
    fields = {}
    for name, hint in typing.get_type_hints(declaration, include_extras=True).items():
        validator = None
        if typing.get_origin(hint) is typing.Annotated:
            hint, *extras = typing.get_args(hint)
            validator = next((e for e in extras if isinstance(e, Choice)), None)
        default = getattr(declaration, name, None)
        fields[name] = (hint, default if default is not None or hint is not str else "", validator)
    return type(declaration.__name__, (_ScriptedNodeWrapper,), {"_fields": fields, "__doc__": declaration.__doc__})


CascadeSegParameterNode = _wrap(CascadeSegParameters)


def parameter_node(scene: typing.Any, module_name: str = MODULE_NAME) -> typing.Any:
    """The scene's CascadeSeg parameter node (added on first use), wrapped.

    Found and created the way ScriptedLoadableModuleLogic.getParameterNode does (a singleton
    vtkMRMLScriptedModuleNode tagged with the module name), so both find the same node.
    """
    node = scene.GetSingletonNode(module_name, "vtkMRMLScriptedModuleNode")
    if node is None:
        node = slicer.vtkMRMLScriptedModuleNode()
        node.SetSingletonTag(module_name)
        node.SetModuleName(module_name)
        node.SetName(scene.GenerateUniqueName(module_name))
        node = scene.AddNode(node)
    return CascadeSegParameterNode(node)


def segment_parameters(values: typing.Any) -> SegmentParameters:
    """The `cascadeseg segment` options the parameter node holds."""
    return SegmentParameters(
        model=values.model or DEFAULT_MODEL, device=values.device, overlap=values.overlap,
        stage1_only=values.stage1Only, keep_probabilities=values.keepProbabilities,
        keep_candidates=values.keepCandidates, refine=values.refine,
        create_new_segmentation=values.outputSegmentation is None)
