-- Pay before the first byte: a per-request payment (x402 or MPP) is bound to
-- the one job it pays for before that job is dispatched, then settled; what
-- the job did not use comes back to the payer as credits, once.

-- The job a reserved payment pays for. The payment's primary key (its
-- replay key) makes "one payment, at most one job" structural; this column
-- names that job.
ALTER TABLE payment_nonces ADD COLUMN job_id TEXT;
CREATE INDEX payment_nonces_job ON payment_nonces (job_id);

-- The job an MPP challenge id was spent on.
ALTER TABLE mpp_challenges ADD COLUMN job_id TEXT;

-- A job's unused payment is credited back once per job.
CREATE UNIQUE INDEX credit_ledger_refund_ref ON credit_ledger (reference) WHERE kind = 'refund';
