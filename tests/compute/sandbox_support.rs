//! A sandbox pool for the tests, or a clean skip where bubblewrap cannot
//! run (not installed, not root); SGL_REQUIRE_SANDBOX=1 turns the skip into
//! a failure.

use std::time::Duration;

use sgl::compute::exec::{
    ExecOutcome, ExecRequest, SandboxConfig, SandboxError, SandboxPool, Size, Stack,
};

/// A pool over a fresh work root, and the temp dir that holds it.
pub struct TestPool {
    pub pool: SandboxPool,
    pub root: tempfile::TempDir,
}

/// The configuration the tests use, with `adjust` applied; `None` (after a
/// note on stderr) where the sandbox cannot run here.
pub fn test_pool_with(adjust: impl FnOnce(&mut SandboxConfig)) -> Option<TestPool> {
    let root = tempfile::tempdir().expect("temp dir");
    let mut cfg = SandboxConfig::new(root.path());
    cfg.slots = 4;
    adjust(&mut cfg);
    match SandboxPool::new(cfg) {
        Ok(pool) => Some(TestPool { pool, root }),
        Err(e) => {
            skip_or_fail(&e);
            None
        }
    }
}

pub fn test_pool() -> Option<TestPool> {
    test_pool_with(|_| {})
}

fn skip_or_fail(e: &SandboxError) {
    if std::env::var("SGL_REQUIRE_SANDBOX").as_deref() == Ok("1") {
        panic!("SGL_REQUIRE_SANDBOX=1 but the sandbox cannot run: {e}");
    }
    eprintln!("skipping sandbox test (apt install bubblewrap; run as root): {e}");
}

pub fn request(stack: Stack, code: &str, timeout: Duration) -> ExecRequest {
    ExecRequest {
        stack,
        size: Size::Small,
        timeout,
        code: code.to_owned(),
        files: Vec::new(),
    }
}

/// Runs `code` with Python on a slot of `pool`.
pub async fn py(pool: &SandboxPool, code: &str, timeout: Duration) -> ExecOutcome {
    run(pool, request(Stack::Python, code, timeout)).await
}

pub async fn run(pool: &SandboxPool, req: ExecRequest) -> ExecOutcome {
    let permit = pool.acquire().await.expect("slot");
    permit.run(req).await.expect("run")
}

/// The sandbox still works normally: after each containment test.
pub async fn assert_healthy(pool: &SandboxPool) {
    let out = py(pool, "print(6 * 7)", Duration::from_secs(20)).await;
    assert_eq!(
        (out.stdout.as_str(), out.exit_code, out.timed_out),
        ("42\n", 0, false),
        "stderr: {}",
        out.stderr
    );
    assert_eq!(pool.busy(), 0);
}

/// Live host processes under a sandbox uid (none may outlive a run; a
/// zombie waiting for the host's init to reap it runs nothing).
pub fn sandbox_processes(uid_base: u32) -> Vec<String> {
    let mut left = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok());
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        if !zombie && uid.is_some_and(|u| u >= uid_base && u < uid_base.saturating_add(65536)) {
            left.push(status.lines().next().unwrap_or("").to_owned());
        }
    }
    left
}
