//! The tables coordinator replicas share (migration `0008_replicas`,
//! PostgreSQL only): each replica's lease, which replica holds each node,
//! which replica holds each job's client stream, the slots each replica's
//! jobs take per node, and the mail too large for a NOTIFY payload.
//!
//! Every lease is compared with the database's clock ([`NOW_MS`]), so the
//! replicas' own clocks never have to agree.

use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};

use super::{Backend, Result, Store, StoreError};

/// The database's clock in unix milliseconds.
const NOW_MS: &str = "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT";

/// NOTIFY payloads must stay under 8,000 bytes; longer messages go through
/// `grid_replica_mail` and the payload names their row.
const MAX_PAYLOAD: usize = 7_000;

/// A node held by another live replica, as seen from this one.
#[derive(Debug, Clone)]
pub struct RemoteNode {
    pub node_id: String,
    pub replica_id: String,
    pub attached: bool,
    pub doc: String,
}

/// A reservation in the shared table; `ttl_ms`: what is left of it.
#[derive(Debug, Clone)]
pub struct StoredReservation {
    pub node_id: String,
    pub model: String,
    pub client: String,
    pub ttl_ms: i64,
}

/// One replica's handle on the shared tables.
#[derive(Debug, Clone)]
pub struct ReplicaDb {
    pool: PgPool,
    id: String,
    lease_ms: i64,
}

impl Store {
    /// The shared tables for replica `id`, whose lease lasts `lease`.
    /// Refused on SQLite: a SQLite file serves one process.
    pub fn replica_db(&self, id: &str, lease: Duration) -> Result<ReplicaDb> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(ReplicaDb {
                pool: bookkeeping_pool(pool),
                id: id.to_string(),
                lease_ms: i64::try_from(lease.as_millis()).unwrap_or(i64::MAX),
            }),
            Backend::Sqlite(_) => Err(StoreError::NeedsPostgres),
        }
    }
}

/// A pool of its own for the replicas' tables, on the same database, whose
/// commits do not wait for the WAL flush (`synchronous_commit = off`).
///
/// Why: a job through a replica that does not hold its node writes its
/// owner row before it is pushed, and a flushed commit took ~4 ms here
/// against ~0.25 ms without the wait, which was most of what such a
/// replica added to a request. These rows are routing state (leases, who
/// holds a node or a job, mail, slot counts), never money: the ledger keeps
/// the main pool's flushed commits. An unflushed commit is visible to every
/// other session at once, so the replicas see the same rows either way;
/// only a crash of the PostgreSQL server itself can lose the last fraction
/// of a second of them, and then every replica's lease has lapsed anyway
/// and the jobs in flight end as jobs whose client left.
fn bookkeeping_pool(pool: &PgPool) -> PgPool {
    let connect = (*pool.connect_options())
        .clone()
        .options([("synchronous_commit", "off")]);
    // A few connections suffice: each statement here is short.
    pool.options()
        .clone()
        .max_connections(8)
        .connect_lazy_with(connect)
}

impl ReplicaDb {
    /// This replica's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The NOTIFY channel of replica `id`.
    pub fn channel(id: &str) -> String {
        format!("sgl_replica_{id}")
    }

    /// Take or renew this replica's lease.
    pub async fn renew(&self) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO grid_replicas (id, lease_until) VALUES ($1, {NOW_MS} + $2) \
             ON CONFLICT (id) DO UPDATE SET lease_until = excluded.lease_until"
        ))
        .bind(&self.id)
        .bind(self.lease_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Give the lease up (a clean stop): its nodes move at once.
    pub async fn leave(&self) -> Result<()> {
        sqlx::query("DELETE FROM grid_replicas WHERE id = $1")
            .bind(&self.id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The live replica that holds the client stream of `job_id`.
    pub async fn job_owner(&self, job_id: &str) -> Result<Option<String>> {
        self.live_owner("grid_replica_jobs", "job_id", job_id).await
    }

    /// The replicas holding the client streams of `job_ids`, as (job id,
    /// replica id) pairs.
    pub async fn job_owners(&self, job_ids: &[String]) -> Result<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT job_id, replica_id FROM grid_replica_jobs WHERE job_id = ANY($1)",
        )
        .bind(job_ids)
        .fetch_all(&self.pool)
        .await?)
    }

    /// The live replica that holds `node_id`.
    pub async fn node_owner(&self, node_id: &str) -> Result<Option<String>> {
        self.live_owner("grid_node_sessions", "node_id", node_id)
            .await
    }

    /// The replica named in `table`'s row whose `key` column is `id`, when
    /// that replica's lease is still running: a row left by a dead replica
    /// names nobody. `table` and `key` are this module's own constants.
    async fn live_owner(&self, table: &str, key: &str, id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as(&format!(
            "SELECT t.replica_id FROM {table} t \
             JOIN grid_replicas r ON r.id = t.replica_id \
             WHERE t.{key} = $1 AND r.lease_until > {NOW_MS}"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.0))
    }

    /// Make this replica the one holding `node_id`; unless `force`, only
    /// when no other live replica holds it.
    pub async fn claim_node(&self, node_id: &str, attached: bool, force: bool) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO grid_node_sessions (node_id, replica_id, attached, updated_at) \
             VALUES ($1, $2, $3, {NOW_MS}) ON CONFLICT (node_id) DO UPDATE SET \
             replica_id = excluded.replica_id, attached = excluded.attached, \
             updated_at = excluded.updated_at \
             WHERE $4 OR grid_node_sessions.replica_id = $2 OR NOT EXISTS \
             (SELECT 1 FROM grid_replicas r WHERE r.id = grid_node_sessions.replica_id \
              AND r.lease_until > {NOW_MS})"
        ))
        .bind(node_id)
        .bind(&self.id)
        .bind(attached)
        .bind(force)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The stored document of a node.
    pub async fn node_doc(&self, node_id: &str) -> Result<Option<String>> {
        let row: Option<(String,)> = sqlx::query_as("SELECT doc FROM grid_nodes WHERE id = $1")
            .bind(node_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.0))
    }

    /// Whether each node this replica still holds is attached; a node
    /// another replica has claimed meanwhile is left to it.
    pub async fn update_own(&self, nodes: &[(String, bool)]) -> Result<()> {
        if nodes.is_empty() {
            return Ok(());
        }
        let ids: Vec<&str> = nodes.iter().map(|(n, _)| n.as_str()).collect();
        let attached: Vec<bool> = nodes.iter().map(|(_, a)| *a).collect();
        sqlx::query(&format!(
            "UPDATE grid_node_sessions s SET attached = u.attached, updated_at = {NOW_MS} \
             FROM UNNEST($1::TEXT[], $2::BOOLEAN[]) AS u(node_id, attached) \
             WHERE s.node_id = u.node_id AND s.replica_id = $3"
        ))
        .bind(&ids)
        .bind(&attached)
        .bind(&self.id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The nodes held by the other live replicas, with their documents.
    pub async fn remote_nodes(&self) -> Result<Vec<RemoteNode>> {
        let rows: Vec<(String, String, bool, String)> = sqlx::query_as(&format!(
            "SELECT s.node_id, s.replica_id, s.attached, n.doc FROM grid_node_sessions s \
             JOIN grid_replicas r ON r.id = s.replica_id \
             JOIN grid_nodes n ON n.id = s.node_id \
             WHERE s.replica_id <> $1 AND r.lease_until > {NOW_MS}"
        ))
        .bind(&self.id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(node_id, replica_id, attached, doc)| RemoteNode {
                node_id,
                replica_id,
                attached,
                doc,
            })
            .collect())
    }

    /// Replace this replica's slot counts per node, and read the other
    /// live replicas' sums per node.
    pub async fn exchange_load(&self, mine: &[(String, i64)]) -> Result<Vec<(String, i64)>> {
        let ids: Vec<&str> = mine.iter().map(|(n, _)| n.as_str()).collect();
        let loads: Vec<i64> = mine.iter().map(|(_, l)| *l).collect();
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM grid_replica_load WHERE replica_id = $1")
            .bind(&self.id)
            .execute(&mut *tx)
            .await?;
        if !ids.is_empty() {
            sqlx::query(
                "INSERT INTO grid_replica_load (replica_id, node_id, load) \
                 SELECT $1, u.node_id, u.load FROM UNNEST($2::TEXT[], $3::BIGINT[]) AS u(node_id, load)",
            )
            .bind(&self.id)
            .bind(&ids)
            .bind(&loads)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let rows: Vec<(String, i64)> = sqlx::query_as(&format!(
            "SELECT l.node_id, SUM(l.load)::BIGINT FROM grid_replica_load l \
             JOIN grid_replicas r ON r.id = l.replica_id \
             WHERE l.replica_id <> $1 AND r.lease_until > {NOW_MS} GROUP BY l.node_id"
        ))
        .bind(&self.id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Record a reservation unless `client` holds `per_client` live ones.
    ///
    /// The count and the insert are one decision per client: under READ
    /// COMMITTED two concurrent inserts of one client (on two replicas, or
    /// two connections of one) each count without the other's uncommitted
    /// row and could both pass the limit. A transaction-scoped advisory
    /// lock on the client serialises them; it is held only for this short
    /// transaction, and other clients never wait on it.
    pub async fn put_reservation(
        &self,
        token_hash: &str,
        r: &StoredReservation,
        per_client: i64,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('sgl_reservations:' || $1, 0))")
            .bind(&r.client)
            .execute(&mut *tx)
            .await?;
        let n = sqlx::query(&format!(
            "INSERT INTO grid_replica_reservations (token_hash, node_id, model, client, expires_at) \
             SELECT $1, $2, $3, $4, {NOW_MS} + $5 WHERE (SELECT COUNT(*) FROM \
             grid_replica_reservations WHERE client = $4 AND expires_at > {NOW_MS}) < $6"
        ))
        .bind(token_hash)
        .bind(&r.node_id)
        .bind(&r.model)
        .bind(&r.client)
        .bind(r.ttl_ms)
        .bind(per_client)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Take a live reservation (single use across replicas).
    pub async fn take_reservation(&self, token_hash: &str) -> Result<Option<StoredReservation>> {
        let row: Option<(String, String, String, i64)> = sqlx::query_as(&format!(
            "DELETE FROM grid_replica_reservations WHERE token_hash = $1 AND expires_at > {NOW_MS} \
             RETURNING node_id, model, client, expires_at - {NOW_MS}"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(
            row.map(|(node_id, model, client, ttl_ms)| StoredReservation {
                node_id,
                model,
                client,
                ttl_ms,
            }),
        )
    }

    /// Record many jobs and send many messages in one statement, so one
    /// commit carries them all: `jobs` are held here (their client
    /// streams); `mail` is (replica, message) pairs, sent in order by
    /// NOTIFY, through the mail table when a message is too long for a
    /// payload (the payload then `#<row id>`). The rows are committed when
    /// the notifications are delivered.
    pub async fn post(&self, jobs: &[String], mail: &[(String, String)]) -> Result<()> {
        let mut channels = Vec::with_capacity(mail.len());
        let mut payloads = Vec::with_capacity(mail.len());
        for (to, message) in mail {
            channels.push(Self::channel(to));
            payloads.push(self.payload(message).await?);
        }
        sqlx::query(&format!(
            "WITH recorded AS (\
               INSERT INTO grid_replica_jobs (job_id, replica_id, created_at) \
               SELECT j, $2, {NOW_MS} FROM unnest($1::text[]) AS j \
               ON CONFLICT (job_id) DO NOTHING) \
             SELECT pg_notify(c, p) FROM unnest($3::text[], $4::text[]) AS m(c, p)"
        ))
        .bind(jobs)
        .bind(&self.id)
        .bind(&channels)
        .bind(&payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The NOTIFY payload of `message`: itself, or the mail row holding it.
    async fn payload(&self, message: &str) -> Result<String> {
        if message.len() <= MAX_PAYLOAD {
            return Ok(message.to_string());
        }
        let (id,): (i64,) = sqlx::query_as(&format!(
            "INSERT INTO grid_replica_mail (body, created_at) VALUES ($1, {NOW_MS}) RETURNING id"
        ))
        .bind(message)
        .fetch_one(&self.pool)
        .await?;
        Ok(format!("#{id}"))
    }

    /// The message a payload stands for (taking a mail row out).
    pub async fn open_payload(&self, payload: &str) -> Result<Option<String>> {
        let Some(id) = payload.strip_prefix('#') else {
            return Ok(Some(payload.to_string()));
        };
        let Ok(id) = id.parse::<i64>() else {
            return Ok(None);
        };
        let row: Option<(String,)> =
            sqlx::query_as("DELETE FROM grid_replica_mail WHERE id = $1 RETURNING body")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.map(|r| r.0))
    }

    /// A listener on this replica's channel.
    pub async fn listen(&self) -> Result<PgListener> {
        let mut l = PgListener::connect_with(&self.pool).await?;
        l.listen(&Self::channel(&self.id)).await?;
        Ok(l)
    }

    /// Drop what nobody will read: job rows older than `jobs_after`, mail
    /// older than a minute, replicas whose lease lapsed an hour ago and
    /// their slot counts.
    pub async fn sweep(&self, jobs_after: Duration) -> Result<()> {
        let jobs_ms = i64::try_from(jobs_after.as_millis()).unwrap_or(i64::MAX);
        sqlx::query(&format!(
            "DELETE FROM grid_replica_jobs WHERE created_at < {NOW_MS} - $1"
        ))
        .bind(jobs_ms)
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM grid_replica_reservations WHERE expires_at < {NOW_MS}"
        ))
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM grid_replica_mail WHERE created_at < {NOW_MS} - 60000"
        ))
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM grid_replica_load l WHERE NOT EXISTS (SELECT 1 FROM grid_replicas r \
             WHERE r.id = l.replica_id AND r.lease_until > {NOW_MS})"
        ))
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!(
            "DELETE FROM grid_replicas WHERE lease_until < {NOW_MS} - 3600000"
        ))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
