-- answers: what was refused and why: rejected requests per minute, tenant and reason (rate_limited, budget_exhausted, overloaded, kill_switch)
SELECT
    toStartOfMinute(published_at) AS minute,
    tenant,
    error_code AS reason,
    count() AS rejected
FROM {db}.telemetry
WHERE status = 'rejected' AND published_at >= now64(3) - toIntervalSecond({since_s})
GROUP BY minute, tenant, reason
ORDER BY minute, tenant, reason
