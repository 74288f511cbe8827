-- answers: how hard each worker works: requests per second it answered, and its service rate (requests answered per second of model busy time)
SELECT
    worker,
    sum(requests) AS requests,
    round(sum(requests) / greatest(1, dateDiff('second', min(minute), max(minute)) + 60), 2) AS requests_per_s,
    sum(misses) AS computed,
    round(sum(compute_ms) / 1000, 3) AS compute_s,
    round(if(sum(compute_ms) = 0, 0, sum(requests) / (sum(compute_ms) / 1000)), 2) AS service_rate_per_s
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY worker
ORDER BY worker
