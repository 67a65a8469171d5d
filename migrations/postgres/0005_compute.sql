-- The Machines API (PostgreSQL). Money is integer micro-USD; times are unix milliseconds.

-- One row per order, written before the provider is called; `id` is the
-- idempotency key the provider sees as a tag. States: creating (intent
-- written), provisioning (the provider accepted), active, failed (nothing
-- charged, or refunded), destroyed, expired.
CREATE TABLE compute_instances (
    id                   TEXT PRIMARY KEY NOT NULL,
    owner                TEXT NOT NULL,
    provider             TEXT NOT NULL,
    provider_instance_id TEXT,
    plan                 TEXT NOT NULL,
    region               TEXT NOT NULL,
    os_id                BIGINT NOT NULL,
    label                TEXT NOT NULL,
    state                TEXT NOT NULL CHECK (state IN ('creating', 'provisioning', 'active', 'failed', 'destroyed', 'expired')),
    ip_address           TEXT,
    hourly               BIGINT NOT NULL CHECK (hourly > 0),
    paid                 BIGINT NOT NULL CHECK (paid >= 0),
    prepaid_hours        BIGINT NOT NULL CHECK (prepaid_hours > 0),
    disk_gb              BIGINT NOT NULL CHECK (disk_gb >= 0),
    expires_at           BIGINT NOT NULL,
    funding              TEXT NOT NULL,
    hold_id              TEXT,
    tx_hash              TEXT,
    ssh_key              BIGINT NOT NULL CHECK (ssh_key IN (0, 1)),
    password_sealed      TEXT,
    password_read_at     BIGINT,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);
CREATE INDEX compute_instances_owner ON compute_instances (owner, created_at);
CREATE INDEX compute_instances_state ON compute_instances (state, expires_at);

-- Every state change of an order, for a human to audit.
CREATE TABLE compute_audit (
    id          BIGSERIAL PRIMARY KEY,
    instance_id TEXT NOT NULL,
    event       TEXT NOT NULL,
    from_state  TEXT,
    to_state    TEXT,
    actor       TEXT NOT NULL,
    amount      BIGINT,
    detail      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX compute_audit_instance ON compute_audit (instance_id, id);
