-- Rows the shop already has before the pipeline starts: the initial snapshot publishes them.
INSERT INTO customers (id, name, email, balance, tags, created_at)
SELECT i, 'Customer ' || i, 'customer' || i || '@example.com', (i * 1.25)::numeric(20, 4),
       CASE WHEN i % 10 = 0 THEN ARRAY['vip'] END, '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 minute'
FROM generate_series(1000, 40999) i;
INSERT INTO "Order Items"
SELECT 1000 + i / 3, i % 3 + 1, 'sku-' || (i % 97), 1 + i % 5, jsonb_build_object('batch', i / 1000)
FROM generate_series(0, 29999) i;
