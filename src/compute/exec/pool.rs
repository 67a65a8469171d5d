//! A bounded pool of sandbox slots.
//!
//! Each run holds one slot; a request that finds none free waits at most
//! `queue_wait`, then gets [`SandboxError::Busy`] (the HTTP layer answers
//! 503 with `Retry-After` and does not settle).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{network, sandbox, ExecOutcome, ExecRequest, SandboxConfig, SandboxError};

/// The sandbox slots; cheap to clone.
#[derive(Clone)]
pub struct SandboxPool {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: SandboxConfig,
    slots: Arc<Semaphore>,
}

/// One slot, held until its run ends.
pub struct SandboxPermit {
    pool: SandboxPool,
    _slot: OwnedSemaphorePermit,
}

impl SandboxPool {
    /// Checks that the tools exist, prepares the work root and starts one
    /// sandbox as a probe; fails closed on anything that would weaken the
    /// isolation.
    pub fn new(cfg: SandboxConfig) -> Result<Self, SandboxError> {
        if cfg.slots == 0 {
            return Err(SandboxError::Setup("slots must be at least 1".into()));
        }
        for (what, path) in [
            ("bwrap", &cfg.bwrap),
            ("python", &cfg.python),
            ("node", &cfg.node),
        ] {
            executable(path)
                .map_err(|e| SandboxError::Setup(format!("{what} at {}: {e}", path.display())))?;
        }
        network::check(&cfg)?;
        sandbox::prepare(&cfg)?;
        let slots = Arc::new(Semaphore::new(cfg.slots));
        Ok(SandboxPool {
            inner: Arc::new(Inner { cfg, slots }),
        })
    }

    /// Takes a slot, waiting at most `queue_wait`.
    pub async fn acquire(&self) -> Result<SandboxPermit, SandboxError> {
        let wait = self.inner.cfg.queue_wait;
        let slot = tokio::time::timeout(wait, self.inner.slots.clone().acquire_owned())
            .await
            .map_err(|_| SandboxError::Busy)?
            .map_err(|_| SandboxError::Busy)?;
        Ok(SandboxPermit {
            pool: self.clone(),
            _slot: slot,
        })
    }

    pub fn slots(&self) -> usize {
        self.inner.cfg.slots
    }

    /// Slots held right now.
    pub fn busy(&self) -> usize {
        self.inner.cfg.slots - self.inner.slots.available_permits()
    }

    pub fn config(&self) -> &SandboxConfig {
        &self.inner.cfg
    }
}

impl SandboxPermit {
    /// Runs one request in a fresh sandbox; the slot is freed when it ends.
    pub async fn run(self, req: ExecRequest) -> Result<ExecOutcome, SandboxError> {
        sandbox::run(&self.pool.inner.cfg, req).await
    }
}

pub(crate) fn executable(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err("not an executable file".into());
    }
    Ok(())
}
