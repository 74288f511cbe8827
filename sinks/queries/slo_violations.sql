-- answers: when the SLO was broken: minutes in which a model's p99 latency passed the threshold (slo_ms)
SELECT
    minute,
    model,
    sum(requests) AS requests,
    round(quantilesMerge(0.5, 0.95, 0.99)(total_ms_q)[3], 1) AS p99_ms,
    {slo_ms} AS slo_ms
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY minute, model
HAVING p99_ms > {slo_ms}
ORDER BY minute, model
SETTINGS prefer_column_name_to_alias = 1
