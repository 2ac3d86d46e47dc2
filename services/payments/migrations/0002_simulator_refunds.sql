-- A refund names the capture it returns money from, so the simulator can refuse one that
-- would return more than that capture took.
ALTER TABLE simulator_operations ADD COLUMN refers_to TEXT NOT NULL DEFAULT '';
