-- Refunds that cannot be lost (PROTOCOL.md §7f "Pay before the first byte"):
-- the part of a settled per-request payment (x402 or MPP) that its job did
-- not use is owed back to the payer as credits. The row is written in the
-- transaction that records the settlement, so the store knows what is owed
-- from the moment the money has moved:
--   open      the job runs; its coordinator renews the lease. If the lease
--             lapses (the coordinator died), the whole payment is owed.
--   owed      the job ended and its exact refund (`owed`) and usage row are
--             recorded, but the credit is still to be made.
--   credited  the refund was credited (ledger row `refund:JOB_ID`), in the
--             same transaction as the job's usage row or as the change
--             from `owed`.
-- A reaper (at start-up and every third of a lease) credits what is due,
-- once: the state moves under a row lock, and the ledger's unique refund
-- reference backs it up.
CREATE TABLE job_refunds (
    job_id      TEXT PRIMARY KEY NOT NULL,
    wallet      TEXT NOT NULL,
    paid        BIGINT NOT NULL CHECK (paid >= 0),
    owed        BIGINT CHECK (owed >= 0 AND owed <= paid),
    state       TEXT NOT NULL CHECK (state IN ('open', 'owed', 'credited')),
    lease_until BIGINT NOT NULL,
    created_at  BIGINT NOT NULL,
    closed_at   BIGINT
);
CREATE INDEX job_refunds_due ON job_refunds (state, lease_until);
