"""Render the extension's screenshot: 3D organ surfaces (anterior view) beside an axial slice.

    python Resources/Screenshots/make_screenshot.py CT SEG_OR_LABELMAP OUT.png [--totalseg]

SEG_OR_LABELMAP is a `.seg.nrrd` (colours from its segment metadata) or a label map with our
label values (colours from Resources/labels.json); `--totalseg` remaps a TotalSegmentator
label map (the sample data's reference) to DEFAULT_ORGANS first. Renders offscreen with VTK
(EGL if available: VTK_DEFAULT_OPENGL_WINDOW=vtkEGLRenderWindow; else OSMesa or xvfb-run).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TOTALSEG = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
            7: "pancreas", 52: "aorta", 63: "inferior_vena_cava", 64: "portal_vein_and_splenic_vein"}
WINDOW = (-160.0, 240.0)
SIZE = 640


def read_labels(path: Path, totalseg: bool) -> tuple[sitk.Image, dict[int, tuple[str, tuple[float, float, float]]]]:
    """Label image and {value: (name, rgb 0..1)}."""
    from CascadeSegLib.labels import DEFAULT_ORGANS, LabelSet

    img = sitk.ReadImage(str(path))
    if img.GetNumberOfComponentsPerPixel() > 1 or img.GetDimension() == 4:
        raise SystemExit(f"{path}: overlapping segment layers are not supported; export a label map")
    labelset = LabelSet.from_names(DEFAULT_ORGANS)
    if totalseg:
        a = sitk.GetArrayFromImage(img)
        lut = np.zeros(max(int(a.max()), 64) + 1, np.uint8)
        for k, name in TOTALSEG.items():
            lut[k] = labelset.by_name(name).value
        out = sitk.GetImageFromArray(lut[a])
        out.CopyInformation(img)
        img = out
    info = {lab.value: (lab.display, lab.color_float) for lab in labelset}
    if str(path).endswith(".seg.nrrd"):
        keys = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
        info = {}
        for k, v in keys.items():
            m = re.fullmatch(r"Segment(\d+)_LabelValue", k)
            if m:
                i = m.group(1)
                rgb = tuple(float(c) for c in keys.get(f"Segment{i}_Color", "0.5 0.5 0.5").split())
                info[int(v)] = (keys.get(f"Segment{i}_Name", f"label {v}"), rgb)  # type: ignore[assignment]
    return img, info


def render_3d(labels: sitk.Image, info: dict, size: int) -> np.ndarray:
    import vtk
    from vtk.util import numpy_support

    a = sitk.GetArrayFromImage(labels)
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    image.SetSpacing(labels.GetSpacing())
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(a.ravel().astype(np.int16), deep=True))

    ren = vtk.vtkRenderer()
    ren.SetBackground(0.08, 0.09, 0.12)
    ren.SetBackground2(0.25, 0.27, 0.33)
    ren.GradientBackgroundOn()
    for value, (_, rgb) in sorted(info.items()):
        if not (a == value).any():
            continue
        surf = vtk.vtkDiscreteFlyingEdges3D()
        surf.SetInputData(image)
        surf.SetValue(0, value)
        smooth = vtk.vtkWindowedSincPolyDataFilter()
        smooth.SetInputConnection(surf.GetOutputPort())
        smooth.SetNumberOfIterations(20)
        smooth.SetPassBand(0.05)
        smooth.NormalizeCoordinatesOn()
        normals = vtk.vtkPolyDataNormals()
        normals.SetInputConnection(smooth.GetOutputPort())
        normals.SetFeatureAngle(80)
        mapper = vtk.vtkPolyDataMapper()
        mapper.SetInputConnection(normals.GetOutputPort())
        mapper.ScalarVisibilityOff()
        actor = vtk.vtkActor()
        actor.SetMapper(mapper)
        prop = actor.GetProperty()
        prop.SetColor(*rgb)
        prop.SetSpecular(0.25)
        prop.SetSpecularPower(20)
        ren.AddActor(actor)

    win = vtk.vtkRenderWindow()
    win.SetOffScreenRendering(1)
    win.SetSize(size, size)
    win.SetMultiSamples(8)
    win.AddRenderer(ren)
    # LPS-ordered array: anterior view = camera at -y looking +y, superior up;
    # the patient's right is then on the viewer's left.
    cam = ren.GetActiveCamera()
    ren.ResetCamera()
    fp = np.array(cam.GetFocalPoint())
    dist = cam.GetDistance()
    cam.SetPosition(*(fp + np.array([0.0, -dist, 0.0])))
    cam.SetViewUp(0, 0, 1)
    ren.ResetCamera()
    cam.Zoom(1.12)
    win.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(win)
    grab.SetInputBufferTypeToRGB()
    grab.ReadFrontBufferOff()
    grab.Update()
    out = grab.GetOutput()
    w, h, _ = out.GetDimensions()
    rgb = numpy_support.vtk_to_numpy(out.GetPointData().GetScalars()).reshape(h, w, 3)
    return rgb[::-1].copy()  # VTK's first row is the bottom


def best_axial_index(a: np.ndarray, info: dict) -> int:
    """The axial slice showing the most organs (ties: the most labelled voxels)."""
    present = np.stack([(a == v).any(axis=(1, 2)) for v in info]).sum(axis=0)
    area = (a > 0).sum(axis=(1, 2))
    return int(np.lexsort((area, present))[-1])


def render_axial(ct: sitk.Image, labels: sitk.Image, info: dict, size: int) -> np.ndarray:
    from scipy import ndimage

    ct_a = sitk.GetArrayFromImage(ct).astype(np.float32)
    lab_a = sitk.GetArrayFromImage(labels)
    k = best_axial_index(lab_a, info)
    gray = np.clip((ct_a[k] - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    lab = lab_a[k]
    for value, (_, color) in info.items():
        m = lab == value
        if not m.any():
            continue
        rgb[m] = 0.55 * rgb[m] + 0.45 * np.array(color)
        edge = m & ~ndimage.binary_erosion(m)
        rgb[edge] = color
    sy, sx = ct.GetSpacing()[1], ct.GetSpacing()[0]
    h, w = lab.shape
    scale = size / max(h * sy, w * sx)
    rgb = ndimage.zoom(rgb, (h * sy * scale / h, w * sx * scale / w, 1), order=1)
    out = np.full((size, size, 3), 0.0)
    oy, ox = (size - rgb.shape[0]) // 2, (size - rgb.shape[1]) // 2
    out[oy:oy + rgb.shape[0], ox:ox + rgb.shape[1]] = rgb[:size, :size]
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ct")
    p.add_argument("segmentation", help=".seg.nrrd or label map")
    p.add_argument("output", help="PNG to write")
    p.add_argument("--totalseg", action="store_true", help="remap TotalSegmentator label values")
    p.add_argument("--size", type=int, default=SIZE, help="height of the picture in pixels")
    args = p.parse_args(argv)

    ct = sitk.DICOMOrient(sitk.ReadImage(args.ct), "LPS")
    labels, info = read_labels(Path(args.segmentation), args.totalseg)
    labels = sitk.DICOMOrient(labels, "LPS")
    if labels.GetSize() != ct.GetSize():
        labels = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    left = render_3d(labels, info, args.size)
    right = render_axial(ct, labels, info, args.size)
    gap = np.full((args.size, 6, 3), 20, np.uint8)
    picture = np.concatenate([left, gap, right], axis=1)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(picture, isVector=True), args.output)
    print(f"wrote {args.output} ({picture.shape[1]}x{picture.shape[0]})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
