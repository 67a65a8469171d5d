-- Operator payouts and the coordinator state that must survive a restart (postgres).
-- Money is integer micro-USD; times are unix milliseconds.

-- A payout batch: operator wallets and the amounts owed to them, made by
-- `sgl coordinator payouts plan` and closed by `payouts mark-paid` with the
-- transaction that paid it.
CREATE TABLE grid_payout_batches (
    id         TEXT PRIMARY KEY NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('planned', 'paid')),
    min_amount BIGINT NOT NULL CHECK (min_amount >= 0),
    total      BIGINT NOT NULL CHECK (total >= 0),
    tx_hash    TEXT,
    created_at BIGINT NOT NULL,
    paid_at    BIGINT,
    CHECK ((state = 'paid') = (tx_hash IS NOT NULL))
);

-- The usage rows a batch pays, one operator share each. The primary key is
-- the usage row: a row is in at most one batch, whatever runs concurrently.
CREATE TABLE grid_payout_items (
    job_id          TEXT PRIMARY KEY NOT NULL REFERENCES grid_usage (job_id),
    batch_id        TEXT NOT NULL REFERENCES grid_payout_batches (id),
    operator_wallet TEXT NOT NULL,
    amount          BIGINT NOT NULL CHECK (amount >= 0)
);
CREATE INDEX grid_payout_items_batch ON grid_payout_items (batch_id, operator_wallet);

-- Single-use codes given with `coordinator serve --registration-code`,
-- once used (hashed): a restart does not make them usable again.
CREATE TABLE grid_used_config_codes (
    code_hash TEXT PRIMARY KEY NOT NULL,
    used_at   BIGINT NOT NULL
);

-- The last price change of each (node, model), for the cooldown between
-- changes (PROTOCOL.md §5.8), kept across restarts and shared by replicas.
CREATE TABLE grid_price_changes (
    node_id    TEXT NOT NULL,
    model      TEXT NOT NULL,
    changed_at BIGINT NOT NULL,
    PRIMARY KEY (node_id, model)
);
