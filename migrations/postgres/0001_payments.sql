-- Payments and credits (PostgreSQL). Money is integer micro-USD; times are unix milliseconds.

-- One credit balance per wallet, shared by the grid and the compute plane.
-- `balance` is spendable; `held` is reserved by open holds (metered requests).
CREATE TABLE wallets (
    wallet          TEXT PRIMARY KEY NOT NULL,
    balance         BIGINT NOT NULL DEFAULT 0 CHECK (balance >= 0),
    held            BIGINT NOT NULL DEFAULT 0 CHECK (held >= 0),
    total_deposited BIGINT NOT NULL DEFAULT 0 CHECK (total_deposited >= 0),
    total_spent     BIGINT NOT NULL DEFAULT 0 CHECK (total_spent >= 0),
    updated_at      BIGINT NOT NULL
);

-- Every movement of credits, one row per movement, written in the same
-- transaction as the balance change.
CREATE TABLE credit_ledger (
    id            BIGSERIAL PRIMARY KEY,
    wallet        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    amount        BIGINT NOT NULL CHECK (amount >= 0),
    balance_after BIGINT NOT NULL,
    reference     TEXT,
    created_at    BIGINT NOT NULL
);
CREATE INDEX credit_ledger_wallet ON credit_ledger (wallet, id);
-- A top-up is credited once per payment reference.
CREATE UNIQUE INDEX credit_ledger_topup_ref ON credit_ledger (reference) WHERE kind = 'topup';

CREATE TABLE credit_holds (
    id         TEXT PRIMARY KEY NOT NULL,
    wallet     TEXT NOT NULL,
    amount     BIGINT NOT NULL CHECK (amount >= 0),
    state      TEXT NOT NULL CHECK (state IN ('held', 'settled', 'released')),
    charged    BIGINT,
    reference  TEXT,
    created_at BIGINT NOT NULL,
    closed_at  BIGINT
);
CREATE INDEX credit_holds_open ON credit_holds (state, created_at);

-- API keys: only the SHA-256 of the key is stored.
CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY NOT NULL,
    wallet     TEXT NOT NULL,
    label      TEXT NOT NULL,
    key_hash   BYTEA NOT NULL UNIQUE,
    key_last4  TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX api_keys_wallet ON api_keys (wallet, created_at);

-- Consumed EIP-3009 authorizations (x402 and MPP). The primary key is the
-- replay key: a second presentation of the same authorization cannot insert.
-- `state` is 'pending' while the facilitator settles, then 'settled'; a
-- failed settlement deletes the row so nothing is consumed.
CREATE TABLE payment_nonces (
    chain_id    BIGINT NOT NULL,
    asset       TEXT NOT NULL,
    payer       TEXT NOT NULL,
    nonce       TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('pending', 'settled')),
    scheme      TEXT NOT NULL,
    resource    TEXT NOT NULL,
    amount      TEXT NOT NULL,
    transaction_ref TEXT,
    created_at  BIGINT NOT NULL,
    settled_at  BIGINT,
    PRIMARY KEY (chain_id, asset, payer, nonce)
);

-- X-Auth request-signature nonces, kept until their timestamp window closes.
CREATE TABLE auth_nonces (
    chain      TEXT NOT NULL,
    address    TEXT NOT NULL,
    nonce      TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (chain, address, nonce)
);
CREATE INDEX auth_nonces_expiry ON auth_nonces (expires_at);

-- MPP challenge ids, single use.
CREATE TABLE mpp_challenges (
    id         TEXT PRIMARY KEY NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ('pending', 'used')),
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
