//! Pay-per-request code execution: Python or Node.js programs run in a fresh
//! bubblewrap sandbox per request.
//!
//! - This module: the request and outcome types, the size tiers and their
//!   limits, and the file-name rule for uploaded files.
//! - [`pool`]: [`SandboxPool`], a bounded number of slots; a request waits
//!   at most `queue_wait` for one, then gets [`SandboxError::Busy`].
//! - [`sandbox`]: one run: the work directory, the bwrap command line, the
//!   rlimits, the wall-clock kill of the whole process tree, the capped
//!   capture of stdout/stderr and the collection of output files.
//! - [`network`]: the network policy (`none`, or egress through `pasta`
//!   without access to the host's loopback or private ranges).

pub mod bazaar;
pub mod http;
pub mod network;
pub mod pool;
pub mod pricing;
pub mod sandbox;

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use network::NetworkPolicy;
pub use pool::{SandboxPermit, SandboxPool};

/// The language a request's code is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stack {
    #[default]
    Python,
    Node,
}

impl Stack {
    pub fn as_str(self) -> &'static str {
        match self {
            Stack::Python => "python",
            Stack::Node => "node",
        }
    }

    /// The name the code is written to in the work directory.
    pub(crate) fn script_name(self) -> &'static str {
        match self {
            Stack::Python => "main.py",
            Stack::Node => "main.js",
        }
    }
}

/// The size tier a request pays for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    #[default]
    Small,
    Med,
    Large,
}

/// The limits of one size tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizeLimits {
    /// The timeout when the request names none.
    pub default_timeout: Duration,
    /// The largest timeout a request may ask for (the caller clamps).
    pub max_timeout: Duration,
    /// RLIMIT_AS of every process in the sandbox.
    pub memory_bytes: u64,
    /// RLIMIT_CPU of every process in the sandbox.
    pub cpu_seconds: u64,
    /// The number of tasks (processes and threads) the sandbox may hold at
    /// once; see [`sandbox`] for how it is enforced.
    pub max_processes: u64,
    /// RLIMIT_FSIZE: the largest file the code may write.
    pub max_file_bytes: u64,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// Each of stdout and stderr is captured up to this many bytes.
    pub max_output_bytes: usize,
    /// The total size of the output files returned.
    pub max_result_files_bytes: usize,
}

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

impl Size {
    pub const ALL: [Size; 3] = [Size::Small, Size::Med, Size::Large];

    /// The seed's tiers: small 2 vCPU / 1 GB / 30 s (5 min max), med 4 vCPU /
    /// 4 GB / 60 s (10 min), large 8 vCPU / 8 GB / 120 s (1 h).
    pub fn limits(self) -> SizeLimits {
        let (default_s, max_s, mem, vcpu) = match self {
            Size::Small => (30, 300, GIB, 2),
            Size::Med => (60, 600, 4 * GIB, 4),
            Size::Large => (120, 3600, 8 * GIB, 8),
        };
        SizeLimits {
            default_timeout: Duration::from_secs(default_s),
            max_timeout: Duration::from_secs(max_s),
            memory_bytes: mem,
            // The wall clock is the real bound; CPU seconds only stop a
            // process that outlives it somehow, so allow every vCPU busy.
            cpu_seconds: max_s * vcpu,
            max_processes: 16 * vcpu,
            max_file_bytes: 64 * MIB * vcpu,
            max_open_files: 256,
            max_output_bytes: 1024 * 1024,
            max_result_files_bytes: 10 * 1024 * 1024,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Med => "med",
            Size::Large => "large",
        }
    }

    fn index(self) -> usize {
        match self {
            Size::Small => 0,
            Size::Med => 1,
            Size::Large => 2,
        }
    }
}

/// The default first uid of the sandboxes: far above the uids of accounts
/// and of the subordinate ranges (`/etc/subuid`) distributions hand out, and
/// below 2^31, which bwrap's uid map cannot go past.
pub const DEFAULT_UID_BASE: u32 = 1_900_000_000;

/// The configuration of a [`SandboxPool`].
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub bwrap: PathBuf,
    pub python: PathBuf,
    pub node: PathBuf,
    /// pasta (Debian's `passt`), for the `egress` policy.
    pub pasta: PathBuf,
    /// iproute2's `ip`, for the `egress` policy's namespaces and rules.
    pub ip: PathBuf,
    pub network: NetworkPolicy,
    /// How many sandboxes run at once.
    pub slots: usize,
    /// How long a request waits for a slot before [`SandboxError::Busy`].
    pub queue_wait: Duration,
    /// The parent of the per-request work directories; created 0700.
    pub work_root: PathBuf,
    /// The limits of each size, indexed small, med, large.
    pub limits: [SizeLimits; 3],
    /// The first of the unprivileged host uids the runs take, one per
    /// concurrent run (up to 65536 of them); no account may use them.
    pub uid_base: u32,
}

impl SandboxConfig {
    /// The defaults, with per-request work directories under `work_root`.
    pub fn new(work_root: impl Into<PathBuf>) -> Self {
        SandboxConfig {
            bwrap: PathBuf::from("/usr/bin/bwrap"),
            python: PathBuf::from("/usr/bin/python3"),
            node: PathBuf::from("/usr/bin/node"),
            pasta: PathBuf::from("/usr/bin/pasta"),
            ip: PathBuf::from("/sbin/ip"),
            network: NetworkPolicy::None,
            slots: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            queue_wait: Duration::from_secs(2),
            work_root: work_root.into(),
            limits: Size::ALL.map(Size::limits),
            uid_base: DEFAULT_UID_BASE,
        }
    }

    /// The limits this pool applies to `size`.
    pub fn limits_for(&self, size: Size) -> &SizeLimits {
        &self.limits[size.index()]
    }
}

/// One execution, as the HTTP layer validated it.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub stack: Stack,
    pub size: Size,
    /// Already clamped by the caller to the size's `max_timeout`.
    pub timeout: Duration,
    pub code: String,
    /// Input files; every name passes [`valid_file_name`].
    pub files: Vec<(String, Vec<u8>)>,
}

/// The result of a run that started, whatever the program did.
#[derive(Debug, Clone)]
pub struct ExecOutcome {
    /// `sbx_` and 16 random hex digits.
    pub sandbox_id: String,
    /// Lossy UTF-8, at most `max_output_bytes` of the program's output, with
    /// a marker line appended when cut.
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// The exit status; 128 + signal when killed by a signal.
    pub exit_code: i32,
    /// The wall clock ran out and the whole process tree was killed.
    pub timed_out: bool,
    pub execution_time_ms: u64,
    /// Regular files created or changed in the work directory, by relative
    /// path with `/` separators, up to `max_result_files_bytes` in total.
    pub files: Vec<(String, Vec<u8>)>,
    /// Some output files were left out for the size cap.
    pub files_truncated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("every sandbox slot is busy")]
    Busy,
    #[error("sandbox setup: {0}")]
    Setup(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("sandbox i/o: {0}")]
    Io(#[from] std::io::Error),
}

/// The names accepted for uploaded files: a relative path of at most
/// [`MAX_FILE_DEPTH`] components separated by `/`, 255 bytes in all, each
/// component non-empty, not `.` or `..`, without NUL, backslash or control
/// characters. The script's own name (`main.py` / `main.js`) is refused by
/// the runner, not here, since it depends on the stack.
pub fn valid_file_name(name: &str) -> bool {
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    if name.chars().any(|c| c.is_control() || c == '\\') {
        return false;
    }
    let parts: Vec<&str> = name.split('/').collect();
    parts.len() <= MAX_FILE_DEPTH
        && parts
            .iter()
            .all(|p| !p.is_empty() && *p != "." && *p != "..")
}

/// How deep an uploaded file may sit in the work directory.
pub const MAX_FILE_DEPTH: usize = 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names() {
        for ok in ["data.csv", "a/b.txt", "a/b/c/d", ".hidden", "x..y"] {
            assert!(valid_file_name(ok), "{ok}");
        }
        let long = "a".repeat(256);
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/",
            "./a",
            ".",
            "a\0b",
            "a\\b",
            "a/b/c/d/e",
            "a\nb",
            &long,
        ] {
            assert!(!valid_file_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn serde_names() {
        assert_eq!(serde_json::to_string(&Stack::Node).unwrap(), "\"node\"");
        assert_eq!(serde_json::from_str::<Size>("\"med\"").unwrap(), Size::Med);
        assert!(serde_json::from_str::<Size>("\"huge\"").is_err());
    }
}
