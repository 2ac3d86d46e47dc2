-- The embedded event log (events.db): topics split into partitions, append-only records,
-- and the offsets each consumer group has committed.
CREATE TABLE topics (
    topic TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL
);

CREATE TABLE records (
    topic TEXT NOT NULL,
    part INTEGER NOT NULL,
    offs BIGINT NOT NULL,
    record_key TEXT NOT NULL,
    headers TEXT NOT NULL,
    payload {{BLOB}} NOT NULL,
    appended_at BIGINT NOT NULL,
    PRIMARY KEY (topic, part, offs)
);

CREATE TABLE group_offsets (
    group_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    part INTEGER NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (group_id, topic, part)
);
