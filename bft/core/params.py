"""Protocol parameters, written out in full in every cluster.toml so operators see the defaults."""

from __future__ import annotations

from dataclasses import dataclass, fields

# Results up to this size always travel in full: a digest would save nothing.
DIGEST_REPLY_BYTES_MIN = 256
# What a replica keeps on disk (README, "Durability"): stable checkpoints only (the paper's);
# also its promise log, written before the messages it covers leave; the same, fsynced first.
DURABILITY_MODES = ("memory", "log", "strict")


@dataclass(frozen=True, slots=True)
class Params:
    checkpoint_interval: int = 128  # K: a checkpoint every K sequence numbers
    log_window: int = 256  # L: high watermark H = h + L (the paper's L = 2K)
    batch_size_max: int = 64  # requests per pre-prepare
    inflight_max: int = 2  # pre-prepared but unexecuted batches before the primary batches
    client_window: int = 64  # requests one client may have in flight (exactly-once window)
    clock_skew_max_ms: int = 5_000  # backups reject batch times further than this from their clock
    status_interval_ms: int = 150  # how often a replica tells peers where it is (loss recovery)
    request_timeout_ms: int = 500  # client: resend to all replicas after this long
    view_timeout_ms: int = 1_000  # backup: start a view change when a request waits this long
    # Adaptive timeouts (README, "Timeouts learned online"): the view timer learns how long
    # requests take to execute and uses that while the primary is silent (bft.core.viewtimer),
    # the client's resend timer how long replies take (bft.core.client), each as Jacobson and
    # Karels's mean plus four deviations (bft.core.estimator), from these floors up to the fixed
    # timeouts above, which they start from. Off: the fixed timeouts.
    adaptive_timeouts: bool = False
    view_timeout_min_ms: int = 500
    request_timeout_min_ms: int = 50
    op_bytes_max: int = 8 * 1024 * 1024  # request argument and reply result
    frame_bytes_max: int = 16 * 1024 * 1024
    # The paper's optimisations, each switchable so its worth can be measured.
    read_only: bool = True  # execute read-only requests at once, 2f+1 matching replies
    read_only_to_quorum: bool = True  # clients send them to 2f+1 replicas, to the rest if those disagree
    tentative: bool = False  # execute once prepared, 2f+1 matching tentative replies
    digest_replies: bool = True  # one replica sends a large result, the others its digest
    replies_from_quorum: bool = True  # clients ask only the replies they need (2f+1, or f+1) of writes
    separate_large_requests: bool = True  # clients send large requests to all; batches carry digests
    large_request_bytes: int = 4096  # what "large" means for the line above
    durability: str = "strict"  # memory | log | strict: see DURABILITY_MODES
    # The slow-primary monitor (bft.core.monitor, after Aardvark's adaptive view change). A
    # backup demands a view change when, while clients are kept waiting, the primary executes
    # fewer requests in a window than this fraction of the best window of the recent views (or
    # of its own view). Half, not Aardvark's 90%: the best window is a maximum, above a correct
    # primary's typical window, and a correct primary under the same load never does half of
    # it, while a slow one does a few percent. 0 turns the monitor off.
    primary_throughput_fraction: float = 0.5
    # A new view's primary is not judged for this long: it re-proposes the NEW-VIEW's batches
    # and clients find it (Aardvark's 5 s). Longer than the simulator's fault phase (4 s), so
    # the seeds' faults end before any view could be judged.
    primary_grace_ms: int = 5_000
    # Throughput is counted in windows this long: long enough that a correct primary's count
    # is steady (hundreds of requests), short enough that a slow one goes within seconds.
    primary_window_ms: int = 1_000
    # Sessions (bft.runtime.session) authenticate every frame; this also encrypts them.
    encrypt: bool = False
    # Proactive recovery (README): each replica in turn, once per period, refreshes its session
    # and request keys and checks its state against the certified checkpoint. It bounds how long
    # keys read from a compromised replica stay useful; README gives its measured cost.
    recovery_period_s: int = 600
    # Clients sign every request (Ed25519, 50 µs or more per request here). False: only where a
    # tag may not do (ClientCore.must_sign); a replica that cannot check a request (tagged under
    # keys it lost in a restart or a recovery) takes it once f+1 replicas vouch for its batch
    # (bft.core.large), so nothing falls behind for it (README, "Faulty clients").
    sign_every_request: bool = False

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                if type(value) is not bool:
                    raise ValueError(f"protocol parameter {f.name} must be true or false")
            elif f.type == "float":
                if type(value) not in (int, float) or not 0 <= value <= 1:
                    raise ValueError(f"protocol parameter {f.name} must be a number from 0 (off) to 1")
            elif f.type == "str":
                if value not in DURABILITY_MODES:
                    raise ValueError(f"protocol parameter {f.name} must be one of {', '.join(DURABILITY_MODES)}")
            elif type(value) is not int or value <= 0:
                raise ValueError(f"protocol parameter {f.name} must be a positive integer")
        if self.log_window < self.checkpoint_interval or self.log_window % self.checkpoint_interval:
            raise ValueError("log_window must be a positive multiple of checkpoint_interval")
        if self.frame_bytes_max < self.op_bytes_max + 4096:
            raise ValueError("frame_bytes_max must exceed op_bytes_max by at least 4096")


DEFAULT_PARAMS = Params()
