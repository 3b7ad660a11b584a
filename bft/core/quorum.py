"""Quorum sizes, written once: with n = 3f+1 replicas, any two sets of 2f+1 share a correct
replica (a certificate), and any f+1 include one (a weak certificate)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Quorum:
    f: int

    @property
    def n(self) -> int:
        return 3 * self.f + 1

    @property
    def strong(self) -> int:
        """2f+1: a certificate (prepared with the pre-prepare, committed, stable, new view)."""
        return 2 * self.f + 1

    @property
    def weak(self) -> int:
        """f+1: at least one correct replica vouches (a reply, a checkpoint digest to fetch)."""
        return self.f + 1

    @property
    def prepares(self) -> int:
        """2f prepares from backups complete a prepared certificate with the pre-prepare."""
        return 2 * self.f

    @staticmethod
    def support(votes: dict[int, bytes], value: bytes | None) -> int:
        """How many distinct senders voted for ``value``."""
        return sum(1 for v in votes.values() if v == value)
