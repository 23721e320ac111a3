"""The imaging tasks lungsql serves, and what each declares: the shape of a study, its labels and
the unit the training split keeps together (always the patient, so that no patient's images are on
both sides of a validation).

- `lung_cancer`: a CT series is a volume, featurized as groups of three slices and pooled into one
  patient vector; one binary label per patient (Kaggle DSB 2017).
- `chest_xray14`: a frontal chest radiograph is one image and one image vector; any of 14 findings
  per image (NIH ChestX-ray14), one LightGBM booster per finding.

The tables say the same (lungsql.tasks, lungsql.findings); this module is what the Python reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from lungsql.errors import ConfigurationError

#: The findings of NIH ChestX-ray14, in the order of its papers and of lungsql.findings.
CHEST_XRAY14_FINDINGS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion", "Emphysema",
                         "Fibrosis", "Hernia", "Infiltration", "Mass", "Nodule", "Pleural_Thickening", "Pneumonia",
                         "Pneumothorax")


@dataclass(frozen=True)
class Task:
    name: str
    study_shape: str  # 'volume': groups of slices, one vector per patient; 'image': one vector per image
    labels: str  # 'binary' or 'multi_label'
    findings: tuple[str, ...] = ()
    split_unit: str = "patient"
    default_model_name: str = "lightgbm"


LUNG_CANCER = Task("lung_cancer", "volume", "binary")
CHEST_XRAY14 = Task("chest_xray14", "image", "multi_label", CHEST_XRAY14_FINDINGS, default_model_name="chest_xray14")
TASKS = {t.name: t for t in (LUNG_CANCER, CHEST_XRAY14)}


def get(name: str | None) -> Task:
    """The task called `name` (None: lung_cancer), or a ConfigurationError listing the tasks."""
    if name is None:
        return LUNG_CANCER
    task = TASKS.get(str(name).strip())
    if task is None:
        raise ConfigurationError(f"unknown task {name!r}", hint=f"use one of: {', '.join(TASKS)}")
    return task
