"""What quality sampling is asked to do: ``QualityConfig`` and the ``--min-quality`` floors (``Gate``); stdlib only."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import ConfigError

# gate name -> (row column, allowed comparison)
GATE_METRICS = {
    "mel": "mel", "mel_24k": "mel_24k", "si_sdr": "si_sdr", "si_sdr_24k": "si_sdr_24k", "stoi": "stoi",
    "visqol": "visqol", "lufs_diff": "lufs_diff_abs", "clipping": "clipping_added",
    "bandwidth": "bandwidth_ratio", "ratio": "compression_ratio", "tones": "tones",
}


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str  # "<=" or ">="
    value: float

    @property
    def column(self) -> str:
        """The results column this floor tests."""
        return GATE_METRICS[self.metric]

    def passes(self, row: dict) -> bool:
        v = row.get(self.column)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return True  # not measured for this file (e.g. STOI on music): no verdict
        return v <= self.value if self.op == "<=" else v >= self.value

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_gates(text: str | None) -> tuple[Gate, ...]:
    """``"mel<=1.2,stoi>=0.7"`` -> gates; raises ConfigError naming what is wrong."""
    if not text:
        return ()
    gates = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z_0-9]+)\s*(<=|>=)\s*(-?[0-9.]+)\s*", part)
        if not m or m.group(1) not in GATE_METRICS:
            raise ConfigError(f"--min-quality: cannot read {part.strip()!r}; write e.g. 'mel<=1.2,stoi>=0.7' "
                              f"with metrics {', '.join(GATE_METRICS)}")
        gates.append(Gate(m.group(1), m.group(2), float(m.group(3))))
    return tuple(gates)


@dataclass(frozen=True)
class QualityConfig:
    fraction: float = 0.02  # of archived files, sampled during encode
    seed: int = 0
    min_files: int = 20  # sampled during encode at least (every file of a job this small), then the fraction
    sample_files: int = 20  # sampled by `audioarc quality` when neither --sample nor patterns are given
    excerpt_seconds: float = 30.0  # evaluated span per file (from its middle); 0 = whole file
    visqol: bool = True  # when visqol-python is installed
    visqol_seconds: float = 8.0
    gates: tuple[Gate, ...] = ()
    worst_spectrograms: int = 3
    listen_files: int = 8  # worst files with original/restored excerpt players on the report page
    listen_seconds: float = 8.0

    def validate(self) -> QualityConfig:
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"--quality-sample must be in [0, 1], got {self.fraction}")
        if self.min_files < 0:
            raise ConfigError(f"--quality-min-files must be >= 0, got {self.min_files}")
        if self.sample_files < 1:
            raise ConfigError(f"--sample must be >= 1, got {self.sample_files}")
        return self
