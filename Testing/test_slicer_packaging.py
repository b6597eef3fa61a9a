"""Slicer packaging: the CMake files list exactly the module's files, the .ui has every widget
the code uses, the extension metadata is complete and the icon is a 128x128 PNG."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import SimpleITK as sitk

REPO = Path(__file__).resolve().parent.parent
MODULE = REPO / "CascadeSeg"


def cmake_list(text: str, var: str) -> list[str]:
    m = re.search(r"set\(\s*" + re.escape(var) + r"\s+(.*?)\)", text, re.S)
    assert m, f"{var} not set"
    return [w for w in m.group(1).split() if not w.startswith("#")]


def module_cmake() -> str:
    return (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")


def expand(name: str) -> str:
    return name.replace("${MODULE_NAME}", "CascadeSeg")


def test_every_listed_module_file_exists_and_every_module_file_is_listed():
    text = module_cmake()
    scripts = [expand(s) for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    resources = [expand(s) for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    listed = set(scripts) | set(resources)
    for f in listed:
        assert (MODULE / f).is_file(), f"listed in CascadeSeg/CMakeLists.txt but missing: {f}"
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*")
               if p.is_file() and "__pycache__" not in p.parts and p.name != "CMakeLists.txt"}
    assert on_disk - listed == set(), f"not listed in CascadeSeg/CMakeLists.txt: {sorted(on_disk - listed)}"
    assert all(s.endswith(".py") for s in scripts) and "CascadeSeg.py" in scripts


def test_module_cmake_builds_tests_and_ships_library_and_resources():
    text = module_cmake()
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text
    assert re.search(r"slicer_add_python_unittest\(\s*SCRIPT\s+\$\{MODULE_NAME\}\.py", text)
    assert "CascadeSegLib/*.py" in text and "ctkMacroCompilePythonScript" in text
    for f in cmake_list(text, "CascadeSegLib_RESOURCES"):
        if not f.startswith("$"):
            assert (REPO / f).is_file(), f"run-time resource missing: {f}"
    # what CascadeSegLib reads at run time is shipped
    assert "Resources/labels.json" in text and "Resources/Models.json" in text
    assert "Resources/SampleData/abdomen_ct_3mm.nii.gz" in text  # the self-test's CT


def test_top_level_cmake_metadata():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({key} "[^"]+"\)', text), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in text
    assert "add_subdirectory(CascadeSeg)" in text
    assert "CascadeSeg/Resources/Icons/CascadeSeg.png" in text
    assert "Resources/Screenshots/cascadeseg_result.png" in text


def test_s4ext_and_index_json():
    s4 = dict(line.split(" ", 1) for line in (REPO / "CascadeSeg.s4ext").read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#"))
    for key in ("scm", "scmurl", "scmrevision", "category", "iconurl", "screenshoturls", "description", "homepage"):
        assert s4.get(key, "").strip(), key
    assert s4["category"].strip() == "Segmentation" and s4["scm"].strip() == "git"
    index = json.loads((REPO / "CascadeSeg.json").read_text(encoding="utf-8"))
    assert "slicer-extension-catalog-entry-schema" in index["$schema"]
    assert index["category"] == "Segmentation" and index["scm_url"] == s4["scmurl"].strip()
    assert index["scm_revision"] == s4["scmrevision"].strip() and index["build_subdirectory"] == "."
    assert isinstance(index["build_dependencies"], list) and index["tier"] in (1, 3, 5)


def test_icon_is_128_png():
    img = sitk.ReadImage(str(MODULE / "Resources" / "Icons" / "CascadeSeg.png"))
    assert img.GetSize() == (128, 128) and img.GetNumberOfComponentsPerPixel() in (3, 4)


def test_ui_names_used_by_code_exist():
    tree = ET.parse(MODULE / "Resources" / "UI" / "CascadeSeg.ui")
    names = {w.get("name") for w in tree.iter("widget")}
    sources = [MODULE / "CascadeSeg.py", *(MODULE / "CascadeSegSlicer").glob("*.py")]
    code = "".join(p.read_text(encoding="utf-8") for p in sources)
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", code))
    used |= set(re.findall(r'"(\w+(?:Selector|ComboBox|Button|CheckBox|Label|Bar))"', code))
    assert {"segmentButton", "inputVolumeSelector", "progressBar"} <= used
    assert used - names == set(), f"widgets used in code but missing in CascadeSeg.ui: {sorted(used - names)}"
    classes = {w.get("name"): w.get("class") for w in tree.iter("widget")}
    assert classes["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert classes["outputSegmentationSelector"] == "qMRMLNodeComboBox"


def test_module_file_is_thin_and_logic_has_no_gui_imports():
    module = (MODULE / "CascadeSeg.py").read_text(encoding="utf-8")
    assert len(module.splitlines()) < 200
    for f in ("logic.py", "process.py", "parameters.py", "models.py", "dependencies.py", "headless.py", "runs.py",
              "background.py", "parameter_node.py", "i18n.py", "worker.py", "training.py"):
        top = [ln for ln in (MODULE / "CascadeSegSlicer" / f).read_text(encoding="utf-8").splitlines()
               if re.match(r"(import|from) ", ln)]
        assert not any(re.match(r"(import|from) (qt|ctk|slicer\.util|slicer\.ScriptedLoadableModule)\b", ln)
                       for ln in top), f


def _module_sources() -> list[Path]:
    return [MODULE / "CascadeSeg.py", *sorted((MODULE / "CascadeSegSlicer").glob("*.py"))]


def test_module_files_are_short_and_use_no_other_modules_private_names():
    """Every module file under 500 lines; a `_name` is used only in the file that defines it
    (`obj._name` outside `self`, or `from .x import _name`, is another module's internals)."""
    import ast

    for path in _module_sources():
        text = path.read_text(encoding="utf-8")
        assert len(text.splitlines()) < 500, f"{path.name} has {len(text.splitlines())} lines"
        tree = ast.parse(text)
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        defined |= {t.attr for n in ast.walk(tree) if isinstance(n, (ast.Assign, ast.AnnAssign))
                    for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                    if isinstance(t, ast.Attribute)}
        defined |= {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets
                    if isinstance(t, ast.Name)}
        foreign = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                foreign += [f"from {node.module} import {a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
                  and node.attr not in defined):
                foreign.append(f"line {node.lineno}: .{node.attr}")
        assert not foreign, f"{path.name} uses private names of other modules: {foreign}"
