//! One writer for what a replica sends the others: NOTIFY messages, and
//! the owner rows of the jobs it pushes to other replicas' nodes.
//!
//! Each NOTIFY is a commit of its own, and PostgreSQL serialises the
//! commits that notify (they take one lock on the database), so under load
//! a statement per message made the database the replicas' bottleneck.
//! The writer sends what is waiting at once and, while its statements run,
//! gathers what arrives for the next: an idle replica pays no wait, a busy
//! one pays one commit for many messages. A few statements may run at once,
//! so one slow commit does not hold every message up; messages never
//! depended on each other's order (each call is matched to its answer by
//! id), and a pushed job's owner row goes in the same statement as its
//! push, so it is committed when the push arrives.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::replica::ReplicaDb;
use crate::store::StoreError;

/// The most posts one statement carries; NOTIFY payloads are at most
/// 7,000 bytes, so a statement stays under a few hundred KiB.
const MAX_BATCH: usize = 64;

/// Statements running at once.
const IN_FLIGHT: usize = 4;

/// What is posted.
enum Post {
    /// This replica holds the client stream of a job.
    Record(String),
    /// A message for replica `to`; with a job pushed to it, that job's
    /// owner row.
    Notify {
        to: String,
        text: String,
        job: Option<String>,
    },
}

struct Item {
    post: Post,
    /// Told once the post is committed, when the poster waits for it.
    done: Option<oneshot::Sender<Result<(), String>>>,
}

/// The handle posts go through.
#[derive(Clone)]
pub(super) struct Mailer {
    tx: mpsc::UnboundedSender<Item>,
}

impl Mailer {
    /// Start the writer on `db`; it runs until every handle is dropped.
    pub(super) fn start(db: ReplicaDb) -> Mailer {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write(db, rx));
        Mailer { tx }
    }

    /// Record that this replica holds `job_id`'s client; back once that is
    /// committed.
    pub(super) async fn record_now(&self, job_id: String) -> Result<(), String> {
        self.wait(Post::Record(job_id)).await
    }

    /// Send `text` to replica `to`, without waiting (failures are logged).
    pub(super) fn notify(&self, to: &str, text: String) {
        let to = to.to_string();
        self.enqueue(
            Post::Notify {
                to,
                text,
                job: None,
            },
            None,
        );
    }

    /// Push job `job_id` (`text`) to replica `to`, which holds its node,
    /// recording this replica as the job's owner in the same commit.
    pub(super) fn push(&self, to: &str, text: String, job_id: String) {
        let (to, job) = (to.to_string(), Some(job_id));
        self.enqueue(Post::Notify { to, text, job }, None);
    }

    /// Send `text` to replica `to`; back once it is committed.
    pub(super) async fn notify_now(&self, to: &str, text: String) -> Result<(), String> {
        let to = to.to_string();
        self.wait(Post::Notify {
            to,
            text,
            job: None,
        })
        .await
    }

    fn enqueue(&self, post: Post, done: Option<oneshot::Sender<Result<(), String>>>) {
        // The writer stops only when every handle is gone.
        let _ = self.tx.send(Item { post, done });
    }

    async fn wait(&self, post: Post) -> Result<(), String> {
        let (done, rx) = oneshot::channel();
        self.enqueue(post, Some(done));
        rx.await
            .unwrap_or_else(|_| Err("the replica writer stopped".into()))
    }
}

/// The writer: a statement for what is waiting, and while at most
/// [`IN_FLIGHT`] run, the next.
async fn write(db: ReplicaDb, mut rx: mpsc::UnboundedReceiver<Item>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        // A slot first, then what waits: posts arriving meanwhile join
        // this statement.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let db = db.clone();
        tokio::spawn(async move {
            send(&db, batch).await;
            drop(slot);
        });
    }
}

/// One statement for `batch`; each waiting poster told how it went.
async fn send(db: &ReplicaDb, batch: Vec<Item>) {
    let mut jobs = Vec::new();
    let mut mail = Vec::new();
    let mut waiting = Vec::new();
    for item in batch {
        match item.post {
            Post::Record(job_id) => jobs.push(job_id),
            Post::Notify { to, text, job } => {
                jobs.extend(job);
                mail.push((to, text));
            }
        }
        waiting.extend(item.done);
    }
    let result = db
        .post(&jobs, &mail)
        .await
        .map_err(|e: StoreError| e.to_string());
    if let Err(e) = &result {
        tracing::warn!(
            error = %e,
            jobs = jobs.len(),
            messages = mail.len(),
            "could not write to the other replicas"
        );
    }
    for done in waiting {
        let _ = done.send(result.clone());
    }
}
