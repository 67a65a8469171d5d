//! The state's side of replica mode ([`crate::coordinator::replica`]): the
//! nodes another replica holds are kept here as mirrors of their stored
//! documents, routable while their holder reports them attached, with their
//! jobs pushed through the holder; a node is adopted when its WebSocket (or,
//! its holder gone, any of its calls) reaches this replica.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use tokio::sync::mpsc;

use super::{Grid, Inner, Node};
use crate::proto::api::PendingJob;
use crate::proto::identity::NodeId;
use crate::store::replica::RemoteNode;

/// Where a mirrored node is held.
#[derive(Debug)]
pub struct Remote {
    /// The replica holding the node's WebSocket.
    pub replica: String,
    /// Jobs for the node, carried to that replica; `None` while no live
    /// replica holds it.
    pub push: Option<mpsc::UnboundedSender<PendingJob>>,
}

impl Node {
    /// Take the fields a document carries from `doc`, keeping what this
    /// process knows of the node at run time.
    fn refresh(&mut self, doc: &str) {
        if self.saved_doc.as_deref() == Some(doc) {
            return;
        }
        let Some(mut fresh) = Node::from_doc(&self.id.to_string(), doc, self.last_seen) else {
            return;
        };
        fresh.sockets = std::mem::take(&mut self.sockets);
        fresh.socket_lost = self.socket_lost;
        fresh.heartbeats = self.heartbeats;
        fresh.price_changed = std::mem::take(&mut self.price_changed);
        fresh.remote = self.remote.take();
        fresh.token_issued = self.token_issued;
        fresh.previous_token = self.previous_token.take();
        *self = fresh;
    }
}

impl Inner {
    /// The nodes this replica holds, each with whether it is attached
    /// (online, a WebSocket open here).
    pub fn held_nodes(&self, grid: &Grid, now: Instant) -> Vec<(String, bool)> {
        self.nodes
            .values()
            .filter(|n| n.remote.is_none())
            .map(|n| {
                let attached = !n.sockets.is_empty() && grid.is_online(n, now);
                (n.id.to_string(), attached)
            })
            .collect()
    }

    /// Slots taken here per node: open jobs and settling payments.
    pub fn local_load(&self) -> Vec<(String, i64)> {
        let mut load: HashMap<NodeId, i64> = HashMap::new();
        for j in self.jobs.values() {
            *load.entry(j.node_id).or_default() += 1;
        }
        for (n, s) in &self.settling {
            *load.entry(*n).or_default() += i64::from(*s);
        }
        load.into_iter().map(|(n, l)| (n.to_string(), l)).collect()
    }

    /// The other replicas' slot counts per node.
    pub fn set_remote_load(&mut self, loads: Vec<(String, i64)>) {
        self.remote_load = loads
            .into_iter()
            .filter_map(|(n, l)| Some((NodeId::parse(&n).ok()?, u32::try_from(l).ok()?)))
            .collect();
    }

    /// Jobs held here that their node, heartbeating to another replica,
    /// lists as running.
    pub fn listed_here(&mut self, node_id: &NodeId, job_ids: &[String]) {
        for id in job_ids {
            if let Some(job) = self.jobs.get_mut(id).filter(|j| &j.node_id == node_id) {
                job.stage_mut().listed();
            }
        }
    }

    /// Keep a reservation another replica made (claimed here).
    pub fn put_reservation(&mut self, token: String, r: super::Reservation) {
        self.reservations.insert(token, r);
    }

    /// Close every WebSocket held here (the replica lost its database).
    pub fn drop_sockets(&mut self) {
        for n in self.nodes.values_mut() {
            n.sockets.clear();
        }
    }

    /// Push a job another replica holds to a node's socket here; false
    /// when the node has none open here.
    pub fn push_local(&self, node_id: &NodeId, job: PendingJob) -> bool {
        self.nodes
            .get(node_id)
            .filter(|n| n.remote.is_none())
            .and_then(|n| n.sockets.last())
            .is_some_and(|(_, push)| push.send(job).is_ok())
    }
}

impl Grid {
    /// Hold `node_id` here: a mirror becomes this replica's own node; a
    /// node not in memory is read from `doc`. False when it is unknown.
    pub fn adopt(&self, node_id: &NodeId, doc: Option<&str>) -> bool {
        let mut inner = self.lock();
        if let Some(n) = inner.nodes.get_mut(node_id) {
            // A node held here is newer in memory than in the store (its
            // document is written behind): only a mirror takes the store's.
            if n.remote.is_some() {
                if let Some(doc) = doc {
                    n.refresh(doc);
                }
                n.remote = None;
                tracing::info!(%node_id, "node adopted from another replica");
            }
            return true;
        }
        let Some(node) = doc.and_then(|d| {
            // Silent until it heartbeats or its socket opens here.
            let stale = Instant::now()
                .checked_sub(self.config.heartbeat_interval * (self.config.missed_heartbeats + 1))
                .unwrap_or_else(Instant::now);
            Node::from_doc(&node_id.to_string(), d, stale)
        }) else {
            return false;
        };
        inner.nodes.insert(*node_id, node);
        true
    }

    /// A node as the shared database has it, for reading only (not kept
    /// here): `None` outside replica mode or when it is unknown.
    pub async fn stored_node(&self, node_id: &NodeId) -> Option<Node> {
        let rep = self.replica.as_ref()?;
        let doc = rep.db.node_doc(&node_id.to_string()).await.ok()??;
        Node::from_doc(&node_id.to_string(), &doc, Instant::now())
    }

    /// A node's WebSocket opened here: it is alive now.
    pub fn touch(&self, node_id: &NodeId) {
        if let Some(n) = self.lock().nodes.get_mut(node_id) {
            n.last_seen = Instant::now();
            n.socket_lost = None;
        }
    }

    /// Mirror the nodes the other live replicas hold. `pusher` makes the
    /// way to a replica for a node. Returns the jobs to push again: those
    /// offered to a node whose holder changed (a push to the old holder
    /// may have been lost with it).
    pub fn mirror(
        &self,
        remote: Vec<RemoteNode>,
        pusher: impl Fn(&str, NodeId) -> mpsc::UnboundedSender<PendingJob>,
    ) -> Vec<(mpsc::UnboundedSender<PendingJob>, PendingJob)> {
        let now = Instant::now();
        let mut inner = self.lock();
        let mut seen = HashSet::new();
        let mut again = Vec::new();
        for r in remote {
            let Ok(id) = NodeId::parse(&r.node_id) else {
                continue;
            };
            seen.insert(id);
            if let std::collections::hash_map::Entry::Vacant(slot) = inner.nodes.entry(id) {
                // Silent until its holder reports it attached.
                let stale = now
                    .checked_sub(
                        self.config.heartbeat_interval * (self.config.missed_heartbeats + 1),
                    )
                    .unwrap_or(now);
                match Node::from_doc(&r.node_id, &r.doc, stale) {
                    Some(node) => {
                        slot.insert(node);
                    }
                    None => continue,
                }
            }
            let Some(node) = inner.nodes.get_mut(&id) else {
                continue;
            };
            node.refresh(&r.doc);
            let moved = node
                .remote
                .as_ref()
                .is_none_or(|m| m.replica != r.replica_id || m.push.is_none());
            if moved {
                if node.remote.is_none() && !node.sockets.is_empty() {
                    tracing::info!(node_id = %id, to = %r.replica_id, "node moved to another replica");
                }
                // Its sockets here (if any) close; their jobs keep running.
                node.sockets.clear();
                let push = pusher(&r.replica_id, id);
                node.remote = Some(Remote {
                    replica: r.replica_id.clone(),
                    push: Some(push.clone()),
                });
                for job in inner.offered_to(&id) {
                    again.push((push.clone(), job));
                }
            }
            if let Some(node) = inner.nodes.get_mut(&id) {
                if r.attached {
                    node.last_seen = now;
                    node.socket_lost = None;
                }
            }
        }
        // Mirrors whose holder is gone: nothing is pushed until a live
        // replica holds them again; they fall silent with their last
        // report. Their jobs keep running (the node posts to any replica).
        for n in inner.nodes.values_mut() {
            if let Some(r) = n.remote.as_mut() {
                if !seen.contains(&n.id) {
                    r.push = None;
                }
            }
        }
        again
    }
}
