-- The grid coordinator (postgres): nodes, registration codes and metered usage.
-- Money is integer micro-USD; times are unix milliseconds.

-- A node's registration and standing, as one JSON document (its keys, token
-- hash, attestation record, advertised models, custom prices, counters).
CREATE TABLE grid_nodes (
    id         TEXT PRIMARY KEY NOT NULL,
    wallet     TEXT NOT NULL,
    doc        TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- Single-use registration codes (`sgl coordinator nodes invite`), stored hashed.
CREATE TABLE grid_registration_codes (
    code_hash  TEXT PRIMARY KEY NOT NULL,
    wallet     TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    used_at    BIGINT,
    node_id    TEXT
);

-- One row per finished job: what was generated, what it cost, and the split.
-- The node's usage signature is kept so a bill can be checked against the
-- node's own word.
CREATE TABLE grid_usage (
    job_id            TEXT PRIMARY KEY NOT NULL,
    node_id           TEXT NOT NULL,
    operator_wallet   TEXT NOT NULL,
    payer_wallet      TEXT,
    api_key_id        TEXT,
    method            TEXT NOT NULL,
    model             TEXT NOT NULL,
    status            TEXT NOT NULL CHECK (status IN ('completed', 'aborted', 'failed')),
    prompt_tokens     BIGINT NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens BIGINT NOT NULL CHECK (completion_tokens >= 0),
    input_per_m       BIGINT NOT NULL,
    output_per_m      BIGINT NOT NULL,
    quoted            BIGINT NOT NULL CHECK (quoted >= 0),
    cost              BIGINT NOT NULL CHECK (cost >= 0),
    operator_share    BIGINT NOT NULL CHECK (operator_share >= 0),
    platform_share    BIGINT NOT NULL CHECK (platform_share >= 0),
    stakers_share     BIGINT NOT NULL CHECK (stakers_share >= 0),
    burn_share        BIGINT NOT NULL CHECK (burn_share >= 0),
    usage_signature   TEXT,
    result_signature  TEXT,
    created_at        BIGINT NOT NULL,
    CHECK (operator_share + platform_share + stakers_share + burn_share = cost)
);
CREATE INDEX grid_usage_node ON grid_usage (node_id, created_at);
CREATE INDEX grid_usage_payer ON grid_usage (payer_wallet, created_at);
