"""Label values of public abdominal CT datasets, from each dataset's published label list.

A reference scored with the wrong label values gives a silently wrong Dice (a TotalSegmentator
spleen compared with our liver), so each preset is copied from its source, not guessed:

- totalsegmentator: TotalSegmentator v2 "total" task, `class_map["total"]` in
  totalsegmentator/map_to_binary.py (Wasserthal et al. 2023), 117 classes.
- btcv: Multi-Atlas Labeling Beyond the Cranial Vault, Abdomen (Synapse syn3193805), 13 organs.
- amos: AMOS 2022 `dataset.json` "labels" (Ji et al. 2022), 15 organs.
- msd-liver / msd-spleen / msd-pancreas: Medical Segmentation Decathlon Task03_Liver,
  Task09_Spleen and Task07_Pancreas `dataset.json` "labels" (Antonelli et al. 2022).
- ircadb: 3D-IRCADb-01 ships one mask per structure (MASKS_DICOM/<structure>, 0 outside and 255
  inside), so the organ comes from the mask's name.

Structures that CascadeSeg also segments get CascadeSeg's names (so they are scored); the others
keep the dataset's own names, so their values are named (not "unknown") but never scored.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import UserError
from .labels import LabelSet

_TOTALSEG_HEAD = ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas",
                  "adrenal_gland_right", "adrenal_gland_left", "lung_upper_lobe_left", "lung_lower_lobe_left",
                  "lung_upper_lobe_right", "lung_middle_lobe_right", "lung_lower_lobe_right", "esophagus", "trachea",
                  "thyroid_gland", "small_bowel", "duodenum", "colon", "urinary_bladder", "prostate",
                  "kidney_cyst_left", "kidney_cyst_right", "sacrum"]
_VERTEBRAE = (["S1", "L5", "L4", "L3", "L2", "L1"] + [f"T{i}" for i in range(12, 0, -1)]
              + [f"C{i}" for i in range(7, 0, -1)])
_TOTALSEG_TAIL = ["heart", "aorta", "pulmonary_vein", "brachiocephalic_trunk", "subclavian_artery_right",
                  "subclavian_artery_left", "common_carotid_artery_right", "common_carotid_artery_left",
                  "brachiocephalic_vein_left", "brachiocephalic_vein_right", "atrial_appendage_left",
                  "superior_vena_cava", "inferior_vena_cava", "portal_vein_and_splenic_vein", "iliac_artery_left",
                  "iliac_artery_right", "iliac_vena_left", "iliac_vena_right", "humerus_left", "humerus_right",
                  "scapula_left", "scapula_right", "clavicula_left", "clavicula_right", "femur_left", "femur_right",
                  "hip_left", "hip_right", "spinal_cord", "gluteus_maximus_left", "gluteus_maximus_right",
                  "gluteus_medius_left", "gluteus_medius_right", "gluteus_minimus_left", "gluteus_minimus_right",
                  "autochthon_left", "autochthon_right", "iliopsoas_left", "iliopsoas_right", "brain", "skull"]
_TOTALSEG = (_TOTALSEG_HEAD + [f"vertebrae_{v}" for v in _VERTEBRAE] + _TOTALSEG_TAIL
             + [f"rib_left_{i}" for i in range(1, 13)] + [f"rib_right_{i}" for i in range(1, 13)]
             + ["sternum", "costal_cartilages"])

# BTCV: 1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 esophagus, 6 liver, 7 stomach,
# 8 aorta, 9 inferior vena cava, 10 portal vein and splenic vein, 11 pancreas,
# 12 right adrenal gland, 13 left adrenal gland.
_BTCV = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
         "inferior_vena_cava", "portal_vein_and_splenic_vein", "pancreas", "adrenal_gland_right",
         "adrenal_gland_left"]
# AMOS: ... 8 "arota" (sic), 9 "postcava" (inferior vena cava), 10 pancreas, 11/12 adrenal glands,
# 13 duodenum, 14 bladder, 15 prostate/uterus.
_AMOS = ["spleen", "kidney_right", "kidney_left", "gallbladder", "esophagus", "liver", "stomach", "aorta",
         "inferior_vena_cava", "pancreas", "adrenal_gland_right", "adrenal_gland_left", "duodenum",
         "urinary_bladder", "prostate_or_uterus"]

PRESETS: dict[str, dict[int, str]] = {
    "totalsegmentator": dict(enumerate(_TOTALSEG, start=1)),
    "btcv": dict(enumerate(_BTCV, start=1)),
    "amos": dict(enumerate(_AMOS, start=1)),
    "msd-liver": {1: "liver", 2: "liver_tumor"},
    "msd-spleen": {1: "spleen"},
    "msd-pancreas": {1: "pancreas", 2: "pancreas_tumor"},
}
IRCADB = "ircadb"
IRCADB_VALUE = 255
# 3D-IRCADb-01 mask folder names -> CascadeSeg organ names (compared without case, '_' or digits).
_IRCADB_ORGANS = {"liver": "liver", "spleen": "spleen", "leftkidney": "kidney_left",
                  "rightkidney": "kidney_right", "gallbladder": "gallbladder", "stomach": "stomach",
                  "pancreas": "pancreas", "venacava": "inferior_vena_cava", "aorta": "aorta"}
NAMES = tuple(PRESETS) + (IRCADB,)


def preset_labels(name: str) -> LabelSet:
    """The label set of a dataset preset (not ircadb: that one depends on the mask)."""
    return LabelSet.from_json({"value": v, "name": n} for v, n in PRESETS[name].items())


def ircadb_labels(reference: str | Path) -> LabelSet:
    """One label, 255, named after the 3D-IRCADb-01 mask (MASKS_DICOM/liver -> liver)."""
    from .io import case_name

    key = re.sub(r"[^a-z]", "", case_name(Path(reference)).lower())
    if key not in _IRCADB_ORGANS:
        raise UserError(f"--ref-labels ircadb needs one 3D-IRCADb-01 mask named after its structure "
                        f"({', '.join(sorted(_IRCADB_ORGANS))}), got {Path(reference).name!r}; pass e.g. "
                        "MASKS_DICOM/liver as the reference")
    return LabelSet.from_json([{"value": IRCADB_VALUE, "name": _IRCADB_ORGANS[key]}])
