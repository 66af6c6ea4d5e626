-- A round trip to PostgreSQL and nothing else: run at one connection directly and through the
-- remote mode's delay proxy, the difference is what the proxy adds to each query.
SELECT 1;
