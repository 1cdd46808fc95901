-- What the demo does to the source once the pipeline runs: one statement per transaction.
INSERT INTO customers (id, name, email, balance, tags) VALUES
    (1, 'Ada Lovelace', 'ada@example.com', 1234567890123.4567, ARRAY['vip']),
    (2, 'Grace Hopper', 'grace@example.com', 42, NULL),
    (3, 'Zoë Ångström', NULL, 0.0001, ARRAY['new', 'ünïcode']);
INSERT INTO "Order Items" VALUES
    (100, 1, 'book-001', 2, '{"gift": true}'),
    (100, 2, 'pen-042', 10, '{"colour": "blue", "price": 1.25}'),
    (101, 1, 'lamp-7', 1, NULL);
UPDATE customers SET balance = balance - 100.5, email = 'ada@lovelace.example' WHERE id = 1;
UPDATE customers SET id = 20 WHERE id = 2;
UPDATE "Order Items" SET qty = qty + 1 WHERE order_id = 100 AND "Line No" = 2;
DELETE FROM "Order Items" WHERE order_id = 101;
DELETE FROM customers WHERE id = 3;
