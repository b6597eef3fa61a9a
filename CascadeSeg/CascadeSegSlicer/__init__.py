"""Slicer side of CascadeSeg: parameters, process wrapper, MRML logic and widget controller.

Only `widget.py` needs Qt; everything else runs with slicer-core (MRML without the app), so
the logic is tested headless with pytest.
"""
