"""Every Prometheus metric the service exports (serving.md §3), defined once for gateway and workers.

Names carry the `harmonica_` prefix, base units and `_total` on counters. The cache-hit ratio is not
a metric but PromQL over `harmonica_branch_evaluations_total`:

    sum by (model, method) (rate(harmonica_branch_evaluations_total{outcome="reused"}[5m]))
      / sum by (model, method) (rate(harmonica_branch_evaluations_total[5m]))

Workers run a prefork pool, so they export through prometheus-client's multiprocess mode
(`PROMETHEUS_MULTIPROC_DIR`, set by `python -m worker` before this module is imported). Each side
writes them from one module, `app.api.telemetry` in the gateway and `worker.telemetry` in the workers,
and both create their label sets at zero from the job kinds' table.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Image jobs take sub-second (digits on a CPU) to minutes (PixArt 1024 px); training takes hours.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, 3600)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# 0.999 below 1: an all-compute plan (exactly 1) then reads as 1 in histogram_quantile, not 0.5.
SPEEDUP_BUCKETS = (0.999, 1, 1.1, 1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 5, 6, 8)

# Gateway
JOBS_SUBMITTED = Counter("harmonica_jobs_submitted_total", "Jobs accepted by the gateway", ["kind", "model"])
JOBS_REJECTED = Counter(
    "harmonica_jobs_rejected_total",
    "Job submissions refused (queue_full, key_busy, invalid, unauthorized, too_large)",
    ["reason"],
)

# Gateway (jobs canceled while queued) and workers (everything else)
JOBS_COMPLETED = Counter(
    "harmonica_jobs_completed_total", "Jobs that reached a final state", ["kind", "model", "status"]
)

# Workers
JOBS_IN_PROGRESS = Gauge("harmonica_jobs_in_progress", "Jobs running now", ["kind"], multiprocess_mode="livesum")
QUEUE_TIME = Histogram(
    "harmonica_queue_time_seconds", "Job creation to start of its run", ["kind", "model"], buckets=LATENCY_BUCKETS
)
INFERENCE_TIME = Histogram(
    "harmonica_inference_time_seconds", "Run time of a job on a worker", ["kind", "model"], buckets=LATENCY_BUCKETS
)
E2E_LATENCY = Histogram(
    "harmonica_e2e_latency_seconds", "Job creation to final state", ["kind", "model"], buckets=LATENCY_BUCKETS
)
STEP_TIME = Histogram(
    "harmonica_denoise_step_seconds", "Time of one denoising step", ["model", "method"], buckets=STEP_BUCKETS
)
BRANCH_EVALUATIONS = Counter(
    "harmonica_branch_evaluations_total",
    "Transformer branch evaluations per image batch, computed or reused from the cache",
    ["model", "method", "outcome"],
)
THEORETICAL_SPEEDUP = Histogram(
    "harmonica_theoretical_speedup",
    "MAC-weighted speedup of a generation's cache plan over computing every branch",
    ["model", "method"],
    buckets=SPEEDUP_BUCKETS,
)
IMAGES_GENERATED = Counter("harmonica_images_generated_total", "Images written", ["model"])
MODEL_LOAD_TIME = Histogram(
    "harmonica_model_load_seconds", "Time to load a model into a worker process", ["model"], buckets=LATENCY_BUCKETS
)
REDELIVERIES = Counter("harmonica_job_redeliveries_total", "Jobs delivered again after a worker died", ["kind"])
JOBS_RECOVERED = Counter(
    "harmonica_jobs_recovered_total",
    "Jobs the reconciler re-enqueued (worker_lost: lease expired while running; message_lost: queued, no message)",
    ["kind", "reason"],
)
RECOVERY_REASONS = ("worker_lost", "message_lost")
BATCH_SIZE_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
BATCH_JOBS = Histogram(
    "harmonica_batch_jobs", "Jobs that shared one denoising batch", ["kind"], buckets=BATCH_SIZE_BUCKETS
)
BATCH_ROWS = Histogram(
    "harmonica_batch_rows",
    "Transformer rows of one denoising batch (images, doubled by guidance)",
    ["kind"],
    buckets=BATCH_SIZE_BUCKETS,
)
BATCH_WAIT = Histogram(
    "harmonica_batch_wait_seconds",
    "Time a forming batch waited for compatible jobs",
    ["kind"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
TRAIN_ITERATIONS = Counter("harmonica_router_training_iterations_total", "Router updates done", ["model", "objective"])
TRAIN_LOSS = Gauge(
    "harmonica_router_training_loss",
    "Loss of the latest router update",
    ["model", "objective"],
    multiprocess_mode="mostrecent",
)
TRAIN_TIME = Histogram(
    "harmonica_router_training_seconds",
    "Duration of a finished router training",
    ["model", "objective"],
    buckets=LATENCY_BUCKETS,
)
