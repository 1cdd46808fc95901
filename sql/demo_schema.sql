-- The demo's source schema: a small shop. REPLICA IDENTITY FULL gives every UPDATE and DELETE a full
-- before-image, so an update that leaves a large (TOASTed) value untouched still yields a full row.
CREATE TABLE customers (
    id          bigint PRIMARY KEY,
    name        text NOT NULL,
    email       text,
    balance     numeric(20, 4) NOT NULL DEFAULT 0,
    tags        text[],
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE "Order Items" (
    order_id    integer,
    "Line No"   integer,
    sku         text NOT NULL,
    qty         integer NOT NULL,
    details     jsonb,
    PRIMARY KEY (order_id, "Line No")
);
ALTER TABLE customers REPLICA IDENTITY FULL;
ALTER TABLE "Order Items" REPLICA IDENTITY FULL;
