-- answers: what the autoscaler reads from ClickHouse, per worker over the window: requests answered (per second), hit rate, and the model-time bound of its service rate (answered per second of model busy time, hits included)
SELECT
    worker,
    count() AS answered,
    round(count() / {since_s}, 3) AS answered_rps,
    round(countIf(cache IN ('l1', 'l2', 'coalesced')) / count(), 4) AS hit_rate,
    round(sum(compute_ms) / 1000, 3) AS compute_s,
    round(if(sum(compute_ms) = 0, 0, count() / (sum(compute_ms) / 1000)), 3) AS model_bound_rps
FROM {db}.telemetry
WHERE published_at >= now64(3) - toIntervalSecond({since_s})
GROUP BY worker
ORDER BY worker
