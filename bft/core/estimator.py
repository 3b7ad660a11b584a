"""An online estimate of how long something takes: Jacobson and Karels's mean and mean deviation
(SIGCOMM 1988; RFC 6298's retransmission timer), with back-off on suspicion and bounds.

A timeout set from it is ``mean + 4 * deviation``, times two for every suspicion not yet
forgiven, between a floor and a ceiling the caller takes from its configuration. One estimator
serves PBFT's view-change timer (how long a backup waits for a request to execute), the client's
resend timer (how long a reply takes) and CASD's link bound (how late a diffused message arrives).
Integer arithmetic in the caller's unit: it runs in the sans-IO cores, where every run replays.
"""

from __future__ import annotations

# RFC 6298's gains: the mean moves an eighth of the error, the deviation a quarter.
MEAN_SHIFT, DEVIATION_SHIFT = 3, 2
DEVIATIONS = 4
# A suspicion doubles the estimate; this many on-time samples forgive one.
SUSPICION_MAX = 6
FORGIVE_AFTER = 32


class Estimator:
    __slots__ = ("ceiling", "deviation", "floor", "forgiven", "mean", "samples", "suspicion")

    def __init__(self, floor: int, ceiling: int) -> None:
        assert 0 < floor <= ceiling
        self.floor, self.ceiling = floor, ceiling
        self.mean = 0  # scaled by 2**MEAN_SHIFT, as RFC 6298 keeps it, so small values keep precision
        self.deviation = 0  # scaled by 2**DEVIATION_SHIFT
        self.samples = 0
        self.suspicion = 0  # unforgiven suspicions: each doubles the bound
        self.forgiven = 0  # on-time samples since the last suspicion was forgiven

    def observe(self, sample: int) -> None:
        sample = max(0, sample)
        if not self.samples:
            self.mean = sample << MEAN_SHIFT
            self.deviation = (sample // 2) << DEVIATION_SHIFT
        else:
            error = sample - (self.mean >> MEAN_SHIFT)
            self.mean += error
            self.deviation += abs(error) - (self.deviation >> DEVIATION_SHIFT)
        self.samples += 1
        if self.suspicion:
            self.forgiven += 1
            if self.forgiven >= FORGIVE_AFTER:
                self.suspicion -= 1
                self.forgiven = 0

    def suspect(self) -> None:
        """Something timed out that should not have, or arrived after the bound: back off."""
        self.suspicion = min(self.suspicion + 1, SUSPICION_MAX)
        self.forgiven = 0

    def bound(self, default: int) -> int:
        """The timeout: ``default`` until the first sample, then the estimate, within the bounds."""
        if not self.samples:
            base = default
        else:
            base = (self.mean >> MEAN_SHIFT) + DEVIATIONS * (self.deviation >> DEVIATION_SHIFT)
        return min(self.ceiling, max(self.floor, base) << self.suspicion)
