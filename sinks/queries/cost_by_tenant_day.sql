-- answers: how much, for whom: requests, total cost and cost per request by tenant, model and day
SELECT
    toDate(minute) AS day,
    tenant,
    model,
    sum(requests) AS requests,
    sum(cost_usd) AS cost_usd,
    sum(cost_usd) / sum(requests) AS cost_per_request_usd
FROM {db}.telemetry_minute
WHERE minute >= toStartOfMinute(now() - toIntervalSecond({since_s}))
GROUP BY day, tenant, model
ORDER BY day, tenant, model
