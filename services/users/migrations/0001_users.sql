CREATE TABLE users (
    id TEXT PRIMARY KEY,
    email TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    display_name TEXT NOT NULL,
    -- comma-separated: customer,admin
    roles TEXT NOT NULL,
    -- JSON array of addresses
    addresses TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- One row per login: every refresh token descends from one family; reuse of a spent token
-- revokes the family.
CREATE TABLE token_families (
    id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL REFERENCES users (id),
    created_at BIGINT NOT NULL,
    revoked_at BIGINT,
    revoked_reason TEXT
);

CREATE TABLE refresh_tokens (
    -- SHA-256 of the token, hex; the token itself is never stored.
    token_hash TEXT PRIMARY KEY,
    family_id TEXT NOT NULL REFERENCES token_families (id),
    user_id TEXT NOT NULL REFERENCES users (id),
    issued_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    spent_at BIGINT
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family_id);

-- Failed sign-ins per email, whether or not the account exists (so throttling reveals nothing).
CREATE TABLE login_failures (
    email TEXT PRIMARY KEY,
    failures BIGINT NOT NULL,
    locked_until BIGINT NOT NULL
);
