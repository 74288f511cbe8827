-- answers: how fast, per model and minute: request count and end-to-end latency percentiles (ms)
SELECT
    minute,
    model,
    requests,
    round(q[1], 1) AS p50_ms,
    round(q[2], 1) AS p95_ms,
    round(q[3], 1) AS p99_ms
FROM
(
    SELECT minute, model, sum(requests) AS requests, quantilesMerge(0.5, 0.95, 0.99)(total_ms_q) AS q
    FROM {db}.latency_minute
    WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
    GROUP BY minute, model
)
ORDER BY minute, model
