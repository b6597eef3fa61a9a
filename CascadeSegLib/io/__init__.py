"""Reading and writing CT images and segmentations (SimpleITK only).

Every reader turns SimpleITK's multi-line RuntimeErrors into a one-line `UserError`, because a
bad input path or a damaged file is the user's problem to fix, not a bug. Every writer goes
through a temporary file in the destination folder and `os.replace`, so an interrupted or failed
write never leaves a half-written output or destroys the previous one. Geometry (origin,
spacing, direction) is passed through untouched: no resampling or re-orientation happens here.

Modules: `common` (suffix lists, warnings, ITK messages), `dicom` (series of a folder),
`images` (read/check/write image files, geometry), `segmentation_nrrd` (Slicer `.seg.nrrd`),
`discovery` (the CT inputs of a folder, case names). The public names are re-exported here:
`from CascadeSegLib.io import read_image`.
"""

from .common import (
    NAME_SUFFIXES,
    OUTPUT_SUFFIXES,
    READ_SUFFIXES,
    SEGMENTATION_SUFFIXES,
    WRITE_SUFFIXES,
    Warn,
    print_warning,
)
from .dicom import DicomSeries, is_dicom_folder, list_dicom_series
from .discovery import case_name, collect_inputs, find_images, without_channel
from .images import (
    ImageInfo,
    describe_geometry,
    read_image,
    read_image_info,
    same_file,
    same_geometry,
    write_image,
)
from .segmentation_nrrd import SEG_REPRESENTATION, read_segmentation_nrrd, write_segmentation_nrrd

__all__ = [
    "NAME_SUFFIXES", "OUTPUT_SUFFIXES", "READ_SUFFIXES", "SEGMENTATION_SUFFIXES", "WRITE_SUFFIXES",
    "SEG_REPRESENTATION", "Warn", "print_warning",
    "DicomSeries", "is_dicom_folder", "list_dicom_series",
    "case_name", "collect_inputs", "find_images", "without_channel",
    "ImageInfo", "describe_geometry", "read_image", "read_image_info", "same_file", "same_geometry", "write_image",
    "read_segmentation_nrrd", "write_segmentation_nrrd",
]
