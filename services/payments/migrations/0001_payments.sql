-- One payment per order.
CREATE TABLE payments (
    order_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    status TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    payment_method TEXT NOT NULL,
    failure_reason TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Money movements. At most one of each kind per order: never two captures, never two refunds.
CREATE TABLE transactions (
    id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    provider_ref TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    UNIQUE (order_id, kind)
);
