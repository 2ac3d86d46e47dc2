-- When each group last committed in a partition: a group that has committed nothing for
-- `events.group_expiry_hours` and runs in no process is forgotten (as Kafka forgets the offsets
-- of an empty group), so a consumer that is gone for good stops holding back retention.
-- 0: committed before this column existed; the first retention pass starts its clock.
ALTER TABLE group_offsets ADD COLUMN committed_at BIGINT NOT NULL DEFAULT 0;
