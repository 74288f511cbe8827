-- answers: when the SLO was broken: minutes in which a model's p99 latency passed the threshold (slo_ms)
SELECT minute, model, requests, round(q[3], 1) AS p99_ms, {slo_ms} AS slo_ms
FROM
(
    SELECT minute, model, sum(requests) AS requests, quantilesMerge(0.5, 0.95, 0.99)(total_ms_q) AS q
    FROM {db}.latency_minute
    WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
    GROUP BY minute, model
)
WHERE q[3] > {slo_ms}
ORDER BY minute, model
