//! A job's life on the coordinator, as a type (PROTOCOL.md §6.5, §6.8–§6.10).
//!
//! A job is offered to its node, acknowledged (listed in a heartbeat's
//! `active_job_ids`), then either answered whole (`complete`) or streamed
//! chunk by chunk in `seq` order. When the client leaves mid-stream the job
//! is closed: only the node's settlement chunk is still taken. [`Stage`]
//! holds exactly what is valid at each step and its methods are the only
//! transitions, so an out-of-order event is refused here and nowhere else.
//!
//! No I/O and no clock: the grid applies the transitions under its lock and
//! acts on the [`ChunkStep`] they return. A job that has ended (completed,
//! failed, aborted) leaves the grid's table ([`super::state::Grid::take_job`]).

use std::time::Instant;

use serde_json::Value;
use tokio::sync::mpsc;

use super::billing::{Billed, JobBilling};
use crate::proto::api::{ChunkRequest, CompleteRequest, PendingJob};
use crate::proto::identity::NodeId;

/// What a node tells a waiting client.
#[derive(Debug)]
pub enum JobEvent {
    /// A stream chunk that is not the last.
    Chunk(ChunkRequest),
    /// The final chunk of a stream, after the job was billed (its refund
    /// goes into the last event the client sees).
    Final(ChunkRequest, Billed),
    /// The whole result, after the job was billed.
    Complete(CompleteRequest, Billed),
    Failed(String),
    /// The node could not open or read the client's sealed input (§7f): a
    /// 400 `bad_sealed_input` for the client, not the node's failure.
    BadInput(String),
    /// The node failed before any output and the request may try another
    /// node: the job's billing comes back unclosed, so the retry is paid by
    /// the same (already settled) payment, never by a second one.
    Unstarted(String, JobBilling),
}

/// Where a job stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    /// Offered to the node (pushed, or waiting for a heartbeat poll) and not
    /// yet acknowledged.
    Offered,
    /// The node listed the job as active; no chunk yet.
    Running,
    /// Chunks relayed in order: `next` is the seq expected, `last` the chunk
    /// taken last (an identical repeat is answered again, §6.9).
    Streaming { next: u64, last: Box<ChunkRequest> },
    /// The client left mid-stream: one settlement chunk is still taken, and
    /// in-order chunks before it are answered `closed` and dropped.
    Closed { next: u64, last: Box<ChunkRequest> },
    /// The final or settlement chunk was taken; the job is being billed and
    /// leaves the table. Only a repeat of that chunk is still answered.
    Ended {
        last: Box<ChunkRequest>,
        client_gone: bool,
    },
}

/// The head of a well-formed chunk: its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHead {
    pub seq: u64,
    pub is_final: bool,
}

impl ChunkHead {
    /// `None` unless the chunk carries `seq`, `final` and a ciphertext.
    pub fn of(chunk: &ChunkRequest) -> Option<ChunkHead> {
        match (chunk.seq, chunk.is_final, &chunk.ciphertext) {
            (Some(seq), Some(is_final), Some(_)) => Some(ChunkHead { seq, is_final }),
            _ => None,
        }
    }
}

/// What taking a chunk means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkStep {
    /// An identical repeat of the chunk taken last: answer again, change nothing.
    Repeat { closed: bool },
    /// The next chunk in order: relay it to the client. The final one
    /// completes the job (bill, then release it).
    Relay { is_final: bool },
    /// In order, but the client has gone: answer `closed`, relay nothing.
    Drop,
    /// The settlement chunk after the client left: bill only what was
    /// delivered (§6.12), relay nothing, end the job.
    Settle,
}

/// An event the job's stage does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("chunk seq {got} out of order (expected {expected})")]
    OutOfOrder { got: u64, expected: u64 },
    #[error("the stream has ended")]
    Ended,
    #[error("the job is streaming: its result comes as a final chunk")]
    Streaming,
}

impl Stage {
    /// Offered and never acknowledged: may be offered again, or timed out.
    pub fn is_offered(&self) -> bool {
        matches!(self, Stage::Offered)
    }

    /// No output of the job has reached its client yet.
    pub fn nothing_relayed(&self) -> bool {
        matches!(self, Stage::Offered | Stage::Running)
    }

    /// The node listed the job in a heartbeat.
    pub fn listed(&mut self) {
        if let Stage::Offered = self {
            *self = Stage::Running;
        }
    }

    /// The client stopped reading the stream.
    pub fn client_gone(&mut self) {
        if let Stage::Streaming { next, last } = self {
            *self = Stage::Closed {
                next: *next,
                last: std::mem::take(last),
            };
        }
    }

    /// Whether a whole result (`complete`) may end the job: only before any
    /// chunk. A stream ends with its final chunk, and a client that left is
    /// billed by the settlement chunk, never by a full result.
    pub fn may_complete(&self) -> Result<(), Refused> {
        match self {
            Stage::Offered | Stage::Running => Ok(()),
            Stage::Streaming { .. } | Stage::Closed { .. } => Err(Refused::Streaming),
            Stage::Ended { .. } => Err(Refused::Ended),
        }
    }

    /// What `chunk` would do, without taking it.
    pub fn classify(&self, head: ChunkHead, chunk: &ChunkRequest) -> Result<ChunkStep, Refused> {
        let ChunkHead { seq, is_final } = head;
        let in_order = |expected: u64| {
            if seq == expected {
                Ok(())
            } else {
                Err(Refused::OutOfOrder { got: seq, expected })
            }
        };
        match self {
            Stage::Offered | Stage::Running => {
                in_order(0)?;
                Ok(ChunkStep::Relay { is_final })
            }
            Stage::Streaming { last, .. } if **last == *chunk => {
                Ok(ChunkStep::Repeat { closed: false })
            }
            Stage::Streaming { next, .. } => {
                in_order(*next)?;
                Ok(ChunkStep::Relay { is_final })
            }
            Stage::Closed { last, .. } if **last == *chunk => {
                Ok(ChunkStep::Repeat { closed: true })
            }
            // NODE reuses the last seq for the settlement after `closed` (§6.9).
            Stage::Closed { next, .. } if is_final && (seq + 1 == *next || seq == *next) => {
                Ok(ChunkStep::Settle)
            }
            Stage::Closed { next, .. } => {
                in_order(*next)?;
                Ok(ChunkStep::Drop)
            }
            Stage::Ended { last, client_gone } if **last == *chunk => Ok(ChunkStep::Repeat {
                closed: *client_gone,
            }),
            Stage::Ended { .. } => Err(Refused::Ended),
        }
    }

    /// Take a chunk: the transition [`Stage::classify`] describes.
    pub fn take_chunk(
        &mut self,
        head: ChunkHead,
        chunk: &ChunkRequest,
    ) -> Result<ChunkStep, Refused> {
        let step = self.classify(head, chunk)?;
        let last = Box::new(chunk.clone());
        let next = head.seq + 1;
        match step {
            ChunkStep::Repeat { .. } => {}
            ChunkStep::Relay { is_final: true } => {
                *self = Stage::Ended {
                    last,
                    client_gone: false,
                }
            }
            ChunkStep::Relay { is_final: false } => *self = Stage::Streaming { next, last },
            ChunkStep::Drop => *self = Stage::Closed { next, last },
            ChunkStep::Settle => {
                *self = Stage::Ended {
                    last,
                    client_gone: true,
                }
            }
        }
        Ok(step)
    }
}

/// A job offered to a node, until it ends.
#[derive(Debug)]
pub struct Job {
    pub id: String,
    pub node_id: NodeId,
    pub model: String,
    pub payload: Value,
    pub stream: bool,
    pub offered_at: Instant,
    pub events: mpsc::Sender<JobEvent>,
    /// Who pays, and what is held; closed when the job ends.
    pub billing: Option<JobBilling>,
    /// The client sealed the input itself (sealed mode): a node that cannot
    /// open it blames the client. In plain mode the coordinator sealed it.
    pub client_sealed: bool,
    /// The heartbeat (by the node's count, [`super::state::Node::heartbeats`])
    /// from which a listing without this job means the node lost it; `None`
    /// until the job is known to run (§6.5, the ghost rule).
    pub ghost_from: Option<u64>,
    /// Whether a failure before any output hands the billing back to the
    /// request, which tries another node ([`JobEvent::Unstarted`]).
    pub retry: bool,
    stage: Stage,
}

impl Job {
    /// A job just offered.
    #[allow(clippy::too_many_arguments)]
    pub fn offered(
        id: String,
        node_id: NodeId,
        model: String,
        payload: Value,
        stream: bool,
        offered_at: Instant,
        events: mpsc::Sender<JobEvent>,
        billing: Option<JobBilling>,
    ) -> Job {
        Job {
            id,
            node_id,
            model,
            payload,
            stream,
            offered_at,
            events,
            billing,
            client_sealed: false,
            ghost_from: None,
            retry: false,
            stage: Stage::Offered,
        }
    }

    /// The job is known to run on its node: either a heartbeat numbered
    /// `heartbeat` listed it, so the node's next heartbeat must list it too;
    /// or (`listed` false) a chunk came while the node's last heartbeat was
    /// `heartbeat`. A heartbeat snapshotted before the job started may
    /// still be in flight then, and only the one after it is sent after the
    /// chunk: a node sends its heartbeats one at a time.
    pub fn seen_running(&mut self, heartbeat: u64, listed: bool) {
        let from = heartbeat.saturating_add(if listed { 1 } else { 2 });
        self.ghost_from = Some(self.ghost_from.map_or(from, |f| f.min(from)));
    }

    pub fn stage(&self) -> &Stage {
        &self.stage
    }

    /// The stage, to apply a transition to.
    pub fn stage_mut(&mut self) -> &mut Stage {
        &mut self.stage
    }

    pub fn pending(&self) -> PendingJob {
        PendingJob {
            id: self.id.clone(),
            job_type: "inference".into(),
            model: self.model.clone(),
            input_payload: self.payload.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, is_final: bool, ct: &str) -> (ChunkHead, ChunkRequest) {
        let c = ChunkRequest {
            seq: Some(seq),
            is_final: Some(is_final),
            ciphertext: Some(ct.into()),
            ..Default::default()
        };
        (ChunkHead::of(&c).unwrap(), c)
    }

    fn take(stage: &mut Stage, seq: u64, is_final: bool, ct: &str) -> Result<ChunkStep, Refused> {
        let (h, c) = chunk(seq, is_final, ct);
        stage.take_chunk(h, &c)
    }

    #[test]
    fn a_chunk_needs_seq_final_and_ciphertext() {
        let (_, mut c) = chunk(0, false, "x");
        assert!(ChunkHead::of(&c).is_some());
        c.ciphertext = None;
        assert!(ChunkHead::of(&c).is_none());
        assert!(ChunkHead::of(&ChunkRequest::abort()).is_none());
    }

    #[test]
    fn chunks_are_taken_in_order_only() {
        let mut s = Stage::Offered;
        // The first chunk is seq 0, acknowledged or not.
        assert_eq!(
            take(&mut s, 1, false, "a"),
            Err(Refused::OutOfOrder {
                got: 1,
                expected: 0
            })
        );
        assert_eq!(s, Stage::Offered);
        assert_eq!(
            take(&mut s, 0, false, "a"),
            Ok(ChunkStep::Relay { is_final: false })
        );
        assert!(!s.is_offered());
        // A gap and a step back are both refused, and change nothing.
        let before = s.clone();
        assert_eq!(
            take(&mut s, 2, false, "c"),
            Err(Refused::OutOfOrder {
                got: 2,
                expected: 1
            })
        );
        assert_eq!(
            take(&mut s, 0, false, "other"),
            Err(Refused::OutOfOrder {
                got: 0,
                expected: 1
            })
        );
        assert_eq!(s, before);
        assert_eq!(
            take(&mut s, 1, false, "b"),
            Ok(ChunkStep::Relay { is_final: false })
        );
        assert_eq!(
            take(&mut s, 2, true, "c"),
            Ok(ChunkStep::Relay { is_final: true })
        );
        // After the final chunk nothing more is taken.
        assert_eq!(take(&mut s, 3, false, "d"), Err(Refused::Ended));
        assert_eq!(take(&mut s, 3, true, "d"), Err(Refused::Ended));
    }

    #[test]
    fn an_identical_repeat_is_answered_again() {
        let mut s = Stage::Running;
        take(&mut s, 0, false, "a").unwrap();
        let before = s.clone();
        assert_eq!(
            take(&mut s, 0, false, "a"),
            Ok(ChunkStep::Repeat { closed: false })
        );
        assert_eq!(s, before);
        take(&mut s, 1, true, "b").unwrap();
        assert_eq!(
            take(&mut s, 1, true, "b"),
            Ok(ChunkStep::Repeat { closed: false })
        );
    }

    #[test]
    fn after_the_client_left_only_the_settlement_ends_the_stream() {
        let mut s = Stage::Running;
        take(&mut s, 0, false, "a").unwrap();
        s.client_gone();
        assert_eq!(
            take(&mut s, 0, false, "a"),
            Ok(ChunkStep::Repeat { closed: true })
        );
        // In-order chunks still in flight are answered `closed`, not relayed.
        assert_eq!(take(&mut s, 1, false, "b"), Ok(ChunkStep::Drop));
        assert!(matches!(s, Stage::Closed { next: 2, .. }));
        assert_eq!(
            take(&mut s, 5, true, "z"),
            Err(Refused::OutOfOrder {
                got: 5,
                expected: 2
            })
        );
        // The settlement reuses the last seq (or the next one).
        assert_eq!(take(&mut s, 1, true, "z"), Ok(ChunkStep::Settle));
        assert_eq!(
            take(&mut s, 1, true, "z"),
            Ok(ChunkStep::Repeat { closed: true })
        );
        assert_eq!(take(&mut s, 2, true, "y"), Err(Refused::Ended));

        let mut s = Stage::Running;
        take(&mut s, 0, false, "a").unwrap();
        s.client_gone();
        assert_eq!(take(&mut s, 1, true, "z"), Ok(ChunkStep::Settle));
    }

    #[test]
    fn a_whole_result_ends_only_a_job_that_has_not_streamed() {
        let mut s = Stage::Offered;
        assert_eq!(s.may_complete(), Ok(()));
        s.listed();
        assert_eq!(s, Stage::Running);
        assert_eq!(s.may_complete(), Ok(()));
        take(&mut s, 0, false, "a").unwrap();
        assert_eq!(s.may_complete(), Err(Refused::Streaming));
        // Listing again changes nothing once chunks flow.
        s.listed();
        assert!(matches!(s, Stage::Streaming { next: 1, .. }));
        s.client_gone();
        assert_eq!(s.may_complete(), Err(Refused::Streaming));
        take(&mut s, 0, true, "z").unwrap();
        assert_eq!(s.may_complete(), Err(Refused::Ended));
    }
}
