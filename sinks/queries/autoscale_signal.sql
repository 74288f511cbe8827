-- answers: what the autoscaler needs from ClickHouse: arrival rate, and the measured service rate per worker (requests answered per second of busy model time, hits included)
SELECT
    round(sum(requests) / {since_s}, 3) AS arrival_rps,
    uniqExact(worker) AS workers,
    round(if(sum(compute_ms) = 0, 0, sum(requests) / (sum(compute_ms) / 1000)), 3) AS service_rate_per_worker_rps,
    sum(misses) AS computed,
    round(sum(compute_ms) / 1000, 3) AS compute_s
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
