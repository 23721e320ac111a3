"""How big each benchmark is: the full run and the --quick smoke run."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Sizes:
    patients: int              # synthetic cohort uploaded and featurized (>= 8: training needs 4 per class)
    slices: tuple[int, int]    # slices per patient, 512 x 512 each
    shard_sessions: tuple[int, ...]
    training_patients: tuple[int, ...]
    groups_per_patient: int
    scoring_calls: int
    batch_repeats: int
    web_clients: int
    web_seconds: float
    web_warmup_seconds: float
    web_sweep_clients: tuple[int, ...]  # the same load with fewer clients: latency without queueing
    web_sweep_seconds: float
    xray_patients: int = 80     # synthetic radiograph patients (about 3 images each, 1024 x 1024)
    pacs_patients: int = 6      # of the cohort, pulled from and pushed by Orthanc (960 instances at 160 slices)
    explain_patients: int = 16  # of the cohort, explained and mapped

    def as_json(self) -> dict:
        return asdict(self)


# 32 series of 160 slices: each featurization run covers 5,120 slices (about 10 s with fp32 on 2 cores),
# long enough that a run's rate is not a few seconds of a shared machine's drift.
FULL = Sizes(patients=32, slices=(160, 160), shard_sessions=(1, 2), training_patients=(100, 400, 1600),
             groups_per_patient=20, scoring_calls=1000, batch_repeats=20, web_clients=32, web_seconds=30.0,
             web_warmup_seconds=5.0, web_sweep_clients=(1, 8), web_sweep_seconds=10.0)
QUICK = Sizes(patients=8, slices=(4, 6), shard_sessions=(1, 2), training_patients=(20, 40),
              groups_per_patient=4, scoring_calls=50, batch_repeats=2, web_clients=4, web_seconds=2.0,
              # A worker warms its pool's connections one by one (most of a second each) as it starts:
              # long enough a warm-up that the 1-client run meets warm ones.
              web_warmup_seconds=2.0, web_sweep_clients=(1,), web_sweep_seconds=2.0, xray_patients=12,
              pacs_patients=8)
