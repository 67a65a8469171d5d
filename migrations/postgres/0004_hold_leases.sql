-- Credit holds end even when the coordinator that opened them does not
-- (PROTOCOL.md §7f "Holds always end"): each open hold has a lease, renewed
-- while its job runs; a hold whose lease has passed is released by the
-- coordinator's reaper. Rows from before this migration have no lease and
-- count as lapsed.
ALTER TABLE credit_holds ADD COLUMN lease_until BIGINT;
CREATE INDEX credit_holds_lease ON credit_holds (state, lease_until);
