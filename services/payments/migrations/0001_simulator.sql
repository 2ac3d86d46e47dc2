-- The payment simulator's own memory, in its own database as a real provider's would be: what
-- it did for each idempotency key.
CREATE TABLE simulator_operations (
    idempotency_key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    amount_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    -- transient, captured, declined, refunded
    outcome TEXT NOT NULL,
    reference TEXT NOT NULL,
    reason TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
