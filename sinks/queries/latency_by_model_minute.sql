-- answers: how fast, per model and minute: request count and end-to-end latency percentiles (ms)
SELECT
    minute,
    model,
    sum(requests) AS requests,
    round(quantilesMerge(0.5, 0.95, 0.99)(total_ms_q)[1], 1) AS p50_ms,
    round(quantilesMerge(0.5, 0.95, 0.99)(total_ms_q)[2], 1) AS p95_ms,
    round(quantilesMerge(0.5, 0.95, 0.99)(total_ms_q)[3], 1) AS p99_ms
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY minute, model
ORDER BY minute, model
SETTINGS prefer_column_name_to_alias = 1
