//! One run in a fresh bubblewrap sandbox.

use super::{ExecOutcome, ExecRequest, SandboxConfig, SandboxError};

pub(crate) fn check_platform() -> Result<(), SandboxError> {
    Ok(())
}

pub(crate) async fn run(
    _cfg: &SandboxConfig,
    _req: ExecRequest,
) -> Result<ExecOutcome, SandboxError> {
    Err(SandboxError::Setup(
        "the sandbox runner is not built yet".into(),
    ))
}
