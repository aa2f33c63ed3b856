"""The options of `compressq prune`, as one frozen dataclass built by the CLI and passed down whole."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from compressq.errors import UsageError

UNSTRUCTURED = "unstructured"
CHANNEL = "channel"
N_M_PATTERN = re.compile(r"^(\d+):(\d+)$")
SCOPES = ("local", "global")
CRITERIA = ("magnitude", "random")
DEFAULT_MIN_PARAMETERS = 1024


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float
    pattern: str = UNSTRUCTURED
    scope: str = "local"
    criterion: str = "magnitude"
    seed: int = 0
    exclude: tuple[str, ...] = ()
    keep_first: bool = True
    keep_last: bool = True
    min_parameters: int = DEFAULT_MIN_PARAMETERS
    channel_multiple: int = 8  # channel pattern: kept counts aligned to this (1 = exact counts)
    calibration_samples: int = 256
    batch_size: int = 32
    # Refit: ridge strength relative to the mean diagonal of X^T X, pulling towards the pruned weights.
    refit_ridge: float = 0.01

    def __post_init__(self) -> None:
        self._check_pattern()
        if not 0.0 < self.sparsity < 1.0:
            raise UsageError(f"--sparsity must lie between 0 and 1 (exclusive), got {self.sparsity}",
                             hint="for example --sparsity 0.5 prunes half of the weights")
        if self.scope not in SCOPES:
            raise UsageError(f"unknown --scope '{self.scope}'", hint=f"use one of: {', '.join(SCOPES)}")
        if self.criterion not in CRITERIA:
            raise UsageError(f"unknown --criterion '{self.criterion}'", hint=f"use one of: {', '.join(CRITERIA)}")
        if self.scope == "global" and self.pattern != UNSTRUCTURED:
            raise UsageError(f"--scope global applies to unstructured pruning, not to --pattern {self.pattern}",
                             hint="N:M groups and channels are ranked within each layer; drop --scope global")
        if self.min_parameters < 0 or self.calibration_samples < 1 or self.batch_size < 1:
            raise UsageError("--min-params must be >= 0 and --calibration-samples >= 1")
        if self.channel_multiple < 1:
            raise UsageError("--channel-multiple must be >= 1", hint="1 keeps exact channel counts")

    def _check_pattern(self) -> None:
        if self.pattern in (UNSTRUCTURED, CHANNEL):
            return
        match = N_M_PATTERN.match(self.pattern)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise UsageError(f"unknown --pattern '{self.pattern}'",
                             hint="use unstructured, channel, or N:M such as 2:4")
        implied = 1 - int(match.group(1)) / int(match.group(2))
        if abs(self.sparsity - implied) > 1e-9:
            raise UsageError(f"--pattern {self.pattern} prunes exactly {implied:.0%} of the weights, "
                             f"not {self.sparsity:.0%}", hint=f"drop --sparsity or pass --sparsity {implied:g}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        match = N_M_PATTERN.match(self.pattern)
        return (int(match.group(1)), int(match.group(2))) if match else None

    @property
    def structured(self) -> bool:
        return self.pattern == CHANNEL

    def settings(self) -> dict:
        """What gets stamped into the model's metadata and echoed in --json."""
        return asdict(self) | {"exclude": list(self.exclude)}

    @classmethod
    def from_options(cls, sparsity: float | None, pattern: str = UNSTRUCTURED, **options) -> PruneConfig:
        """Build from CLI options: an N:M pattern implies its sparsity, every other pattern needs one."""
        match = N_M_PATTERN.match(pattern)
        if sparsity is None:
            if not match or int(match.group(2)) == 0:
                raise UsageError("--sparsity is required", hint="for example --sparsity 0.5")
            sparsity = 1 - int(match.group(1)) / int(match.group(2))
        return cls(sparsity=sparsity, pattern=pattern, **options)
