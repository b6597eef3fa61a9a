"""Label-map-driven CT synthesis: plausible CTs in HU from label maps that have no CT.

`synthesize` draws anatomy, contrast phase, unlabelled tissues and scanner effects;
`measure_table` measures the per-structure HU the synthetic images are built from.
"""

from .anatomy import AnatomySettings, warp_labels
from .render import ScanSettings, SynthResult, SynthSettings, synthesize, with_phase
from .tissues import (
                      PHASES,
                      TISSUES,
                      IntensityTable,
                      default_table_path,
                      measure_table,
                      structure_names,
                      tissue_of,
                      totalsegmentator_names,
                      unknown_structures,
)

__all__ = ["AnatomySettings", "IntensityTable", "PHASES", "ScanSettings", "SynthResult", "SynthSettings", "TISSUES",
           "default_table_path", "measure_table", "structure_names", "synthesize", "tissue_of",
           "totalsegmentator_names", "unknown_structures", "warp_labels", "with_phase"]
