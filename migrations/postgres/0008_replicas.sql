-- Coordinator replicas on one database (`sgl coordinator serve --replica`).
-- Times are unix milliseconds of the database's clock, so replicas on
-- machines whose clocks disagree still agree on every lease.

-- One row per running replica; it takes work while its lease is live.
CREATE TABLE grid_replicas (
    id          TEXT PRIMARY KEY NOT NULL,
    lease_until BIGINT NOT NULL
);

-- The replica a node's calls and pushed jobs go to: the one that holds its
-- WebSocket, else the one it registered with. `attached`: the node is
-- online there with an open socket.
CREATE TABLE grid_node_sessions (
    node_id    TEXT PRIMARY KEY NOT NULL,
    replica_id TEXT NOT NULL,
    attached   BOOLEAN NOT NULL,
    updated_at BIGINT NOT NULL
);

-- The replica holding the client stream of each job, for a node's calls
-- about it that land on another replica.
CREATE TABLE grid_replica_jobs (
    job_id     TEXT PRIMARY KEY NOT NULL,
    replica_id TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX grid_replica_jobs_created ON grid_replica_jobs (created_at);

-- Slots of each node taken by each replica's jobs, so every replica counts
-- the node's whole load.
CREATE TABLE grid_replica_load (
    replica_id TEXT NOT NULL,
    node_id    TEXT NOT NULL,
    load       BIGINT NOT NULL,
    PRIMARY KEY (replica_id, node_id)
);

-- Messages between replicas too large for a NOTIFY payload.
CREATE TABLE grid_replica_mail (
    id         BIGSERIAL PRIMARY KEY,
    body       TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- Reservations (POST /v1/reserve) in replica mode: a chat call may claim one
-- on any replica. The token is kept hashed, like node tokens.
CREATE TABLE grid_replica_reservations (
    token_hash TEXT PRIMARY KEY NOT NULL,
    node_id    TEXT NOT NULL,
    model      TEXT NOT NULL,
    client     TEXT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX grid_replica_reservations_client ON grid_replica_reservations (client, expires_at);
