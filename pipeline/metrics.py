"""Per-stage sample counters for Prometheus, exported by Ray's metrics agent beside Ray's own.

Ray prefixes custom metrics with `ray_` and exports a counter with a `_total` suffix, so the
series are `ray_pipeline_samples_in_total{stage=...}`, `..._kept_total`,
`..._dropped_total{reason=...}`, `..._failed_total{reason=...}` and the gauge
`ray_pipeline_stage_throughput{stage=...}` (samples/s); `infra/grafana/` charts them. Counting
is best effort: a run never fails because metrics could not be recorded.
"""

from __future__ import annotations

from functools import cache

from pipeline.manifest import Manifest


@cache
def _instruments() -> dict:
    from ray.util.metrics import Counter, Gauge

    stage, reason = ("stage",), ("stage", "reason")
    return {
        "in": Counter("pipeline_samples_in", "samples a stage received", tag_keys=stage),
        "kept": Counter("pipeline_samples_kept", "samples a stage passed on", tag_keys=stage),
        "dropped": Counter("pipeline_samples_dropped", "samples a stage dropped, by reason", tag_keys=reason),
        "failed": Counter("pipeline_samples_failed", "samples that failed in a stage, by reason", tag_keys=reason),
        "throughput": Gauge("pipeline_stage_throughput", "samples per second of a stage", tag_keys=stage),
    }


def _ready() -> bool:
    import ray

    return ray.is_initialized()


def record_stage(manifest: Manifest) -> None:
    """Add a finished stage's accounting to the counters (skipped stages are not counted again)."""
    if not _ready():
        return
    try:
        metric = _instruments()
        tags = {"stage": manifest.stage}
        for key, value in (("in", manifest.in_count), ("kept", manifest.kept)):
            if value > 0:
                metric[key].inc(value, tags)
        for kind, reasons in (("dropped", manifest.dropped), ("failed", manifest.failed)):
            for reason, count in reasons.items():
                if count > 0:
                    metric[kind].inc(count, {**tags, "reason": reason})
        if manifest.seconds > 0:
            metric["throughput"].set(manifest.in_count / manifest.seconds, tags)
    except Exception:  # noqa: BLE001 (metrics are never worth failing a run for)
        return


def record_throughput(stage: str, samples_per_second: float) -> None:
    """The live rate of a stage while it runs (set by the task fan-out as tasks finish)."""
    if not _ready():
        return
    try:
        _instruments()["throughput"].set(samples_per_second, {"stage": stage})
    except Exception:  # noqa: BLE001
        return
