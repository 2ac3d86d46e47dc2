CREATE TABLE categories (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    slug TEXT NOT NULL UNIQUE,
    parent_id TEXT REFERENCES categories (id),
    created_at BIGINT NOT NULL
);

CREATE TABLE products (
    id TEXT PRIMARY KEY,
    sku TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    description TEXT NOT NULL,
    price_minor BIGINT NOT NULL,
    currency TEXT NOT NULL,
    category_id TEXT REFERENCES categories (id),
    -- JSON object of string attributes
    attributes TEXT NOT NULL,
    -- JSON array of URLs
    image_urls TEXT NOT NULL,
    active BIGINT NOT NULL,
    version BIGINT NOT NULL,
    -- lowercased name and description, for text search on both dialects
    search_text TEXT NOT NULL,
    -- lowercased name, for sorting by name
    sort_name TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX products_newest ON products (created_at, id);
CREATE INDEX products_price ON products (price_minor, id);
CREATE INDEX products_name ON products (sort_name, id);
CREATE INDEX products_category ON products (category_id);

-- Units that can be reserved, and units held by open reservations. Never negative.
CREATE TABLE stock (
    product_id TEXT PRIMARY KEY REFERENCES products (id),
    available BIGINT NOT NULL CHECK (available >= 0),
    reserved BIGINT NOT NULL CHECK (reserved >= 0)
);

-- One reservation per order: HELD, then COMMITTED (paid) or RELEASED (cancelled).
CREATE TABLE reservations (
    order_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE reservation_lines (
    order_id TEXT NOT NULL REFERENCES reservations (order_id),
    product_id TEXT NOT NULL REFERENCES products (id),
    quantity BIGINT NOT NULL,
    PRIMARY KEY (order_id, product_id)
);
