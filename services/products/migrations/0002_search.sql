-- Full-text search, facets and attribute filters.
--
-- `doc` numbers products for the search index: it grows with every product and is never
-- reused. SQLite's FTS5 table points at it (a table without an INTEGER PRIMARY KEY may have
-- its rowids renumbered by VACUUM; `doc` is not). On PostgreSQL it orders matches the same way.
-- sqlite: ALTER TABLE products ADD COLUMN doc BIGINT;
-- sqlite: UPDATE products SET doc = rowid;
-- postgres: ALTER TABLE products ADD COLUMN doc BIGSERIAL;
CREATE UNIQUE INDEX products_doc ON products (doc);

-- The name's words, lowercased and separated by single spaces (`search::normalize`); NULL
-- until the service has written it (rows from before this migration are filled at start).
-- `search_text` holds the description's and the attribute values' words the same way.
ALTER TABLE products ADD COLUMN search_name TEXT;

-- sqlite: CREATE VIRTUAL TABLE products_fts USING fts5(search_name, search_text, content='products', content_rowid='doc', tokenize='unicode61 remove_diacritics 0', prefix='2 3');
-- The names alone, so that "every word in the name" reads only names' entries: a word in every
-- description but no name would otherwise be a scan of its whole list.
-- sqlite: CREATE VIRTUAL TABLE products_name_fts USING fts5(search_name, content='products', content_rowid='doc', tokenize='unicode61 remove_diacritics 0', prefix='2 3');
-- sqlite: INSERT INTO products_fts (products_fts) VALUES ('rebuild');
-- sqlite: INSERT INTO products_name_fts (products_name_fts) VALUES ('rebuild');
-- sqlite: CREATE TRIGGER products_fts_insert AFTER INSERT ON products BEGIN
-- sqlite:   UPDATE products SET doc = (SELECT COALESCE(MAX(doc), 0) + 1 FROM products) WHERE rowid = new.rowid AND new.doc IS NULL;
-- sqlite:   INSERT INTO products_fts (rowid, search_name, search_text) SELECT doc, search_name, search_text FROM products WHERE rowid = new.rowid;
-- sqlite:   INSERT INTO products_name_fts (rowid, search_name) SELECT doc, search_name FROM products WHERE rowid = new.rowid;
-- sqlite: END;
-- sqlite: CREATE TRIGGER products_fts_update AFTER UPDATE OF search_name, search_text ON products BEGIN
-- sqlite:   INSERT INTO products_fts (products_fts, rowid, search_name, search_text) VALUES ('delete', old.doc, old.search_name, old.search_text);
-- sqlite:   INSERT INTO products_fts (rowid, search_name, search_text) VALUES (new.doc, new.search_name, new.search_text);
-- sqlite:   INSERT INTO products_name_fts (products_name_fts, rowid, search_name) VALUES ('delete', old.doc, old.search_name);
-- sqlite:   INSERT INTO products_name_fts (rowid, search_name) VALUES (new.doc, new.search_name);
-- sqlite: END;
-- sqlite: CREATE TRIGGER products_fts_delete AFTER DELETE ON products BEGIN
-- sqlite:   INSERT INTO products_fts (products_fts, rowid, search_name, search_text) VALUES ('delete', old.doc, old.search_name, old.search_text);
-- sqlite:   INSERT INTO products_name_fts (products_name_fts, rowid, search_name) VALUES ('delete', old.doc, old.search_name);
-- sqlite: END;

-- PostgreSQL: the same words under GIN indexes, all of them and (as above) the name's alone.
-- Without `fastupdate`: a write updates the index itself rather than a pending list that every
-- search then reads whole (4 ms per query after a bulk seed of 100k products, until a vacuum).
-- postgres: ALTER TABLE products ADD COLUMN search_vec tsvector GENERATED ALWAYS AS (to_tsvector('simple', COALESCE(search_name, '') || ' ' || search_text)) STORED;
-- postgres: ALTER TABLE products ADD COLUMN name_vec tsvector GENERATED ALWAYS AS (to_tsvector('simple', COALESCE(search_name, ''))) STORED;
-- postgres: CREATE INDEX products_search ON products USING GIN (search_vec) WITH (fastupdate = off);
-- postgres: CREATE INDEX products_search_name ON products USING GIN (name_vec) WITH (fastupdate = off);

-- One row per product attribute, for filters (`brand=Northwind`). `value` is lowercased.
CREATE TABLE product_attributes (
    product_id TEXT NOT NULL REFERENCES products (id),
    name TEXT NOT NULL,
    value TEXT NOT NULL,
    PRIMARY KEY (product_id, name)
);
CREATE INDEX product_attributes_value ON product_attributes (name, value, product_id);

-- Active products per category and price band, kept by every product write in its own
-- transaction: the facets of a browse without a query or other filters read these rows.
-- `category_id` is '' for products without one; the bands are `search::PRICE_BANDS`.
CREATE TABLE catalog_facets (
    category_id TEXT NOT NULL,
    price_band BIGINT NOT NULL,
    products BIGINT NOT NULL,
    PRIMARY KEY (category_id, price_band)
);
INSERT INTO catalog_facets (category_id, price_band, products)
SELECT COALESCE(category_id, ''),
       CASE WHEN price_minor < 1000 THEN 0 WHEN price_minor < 2500 THEN 1
            WHEN price_minor < 5000 THEN 2 WHEN price_minor < 10000 THEN 3
            WHEN price_minor < 25000 THEN 4 WHEN price_minor < 50000 THEN 5
            WHEN price_minor < 100000 THEN 6 ELSE 7 END,
       COUNT(*)
FROM products WHERE active = 1
GROUP BY 1, 2;

-- Words of four letters or more in active products, with how many products hold each, and
-- how many in their name: the vocabulary a misspelt query word is corrected against, a last
-- word completed from, and PostgreSQL's plans chosen by.
CREATE TABLE search_terms (
    term TEXT PRIMARY KEY,
    products BIGINT NOT NULL,
    in_names BIGINT NOT NULL
);
