-- A cart per user.
CREATE TABLE cart_lines (
    user_id TEXT NOT NULL,
    product_id TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, product_id)
);

-- Checkout attempts by idempotency key. RESERVING: stock is being reserved for order_id;
-- PLACED: the order exists; FAILED: refused (the error is kept and answered again);
-- ABANDONING / ABANDONED: a crashed attempt whose reservation is being / was released.
CREATE TABLE checkouts (
    user_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    order_id TEXT NOT NULL UNIQUE,
    state TEXT NOT NULL,
    -- JSON [[product_id, quantity], ...]: the cart as it was when the attempt began
    lines TEXT NOT NULL,
    error TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (user_id, idempotency_key)
);
CREATE INDEX checkouts_state ON checkouts (state, created_at);

CREATE TABLE orders (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    currency TEXT NOT NULL,
    subtotal_minor BIGINT NOT NULL,
    shipping_minor BIGINT NOT NULL,
    total_minor BIGINT NOT NULL,
    shipping_address TEXT NOT NULL,
    payment_method_token TEXT NOT NULL,
    paid BIGINT NOT NULL,
    refunded BIGINT NOT NULL,
    cancel_reason TEXT NOT NULL,
    payment_deadline BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX orders_user ON orders (user_id, id);
CREATE INDEX orders_status ON orders (status, payment_deadline);

CREATE TABLE order_lines (
    order_id TEXT NOT NULL REFERENCES orders (id),
    line_no BIGINT NOT NULL,
    product_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    name TEXT NOT NULL,
    unit_price_minor BIGINT NOT NULL,
    quantity BIGINT NOT NULL,
    PRIMARY KEY (order_id, line_no)
);
