"""CascadeSeg engine: cascaded 3D FCN segmentation of abdominal CT (Roth et al. 2018).

Importable without 3D Slicer, Qt or MRML; the Slicer module is a thin shell over it.
"""

__version__ = "0.1.0"
