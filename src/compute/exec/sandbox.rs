//! One run in a fresh bubblewrap sandbox.
//!
//! # Isolation
//! - **Identity.** bwrap runs as an unprivileged host uid of its own (one
//!   per concurrent run, counted from `uid_base`) with no
//!   supplementary groups, inside a new user namespace (`--unshare-user`,
//!   `--disable-userns`, `--cap-drop ALL`). The code therefore holds no
//!   capability anywhere and host files are checked against a uid that owns
//!   nothing but the run's work directory. This is why the runner needs root:
//!   to switch to that uid.
//! - **Namespaces.** New mount, PID, IPC, UTS, cgroup and network namespaces
//!   per run (under the `egress` policy the network namespace is made by
//!   root before bwrap starts and bwrap joins it: see [`super::network`]);
//!   `--new-session` (no terminal injection), `--die-with-parent` (and bwrap
//!   itself dies with this process through `PR_SET_PDEATHSIG`).
//! - **File system.** Only `/usr` (read-only; `/bin`, `/lib`, `/lib64`,
//!   `/sbin` as on the host), a few `/etc` files the interpreters and TLS need
//!   (`ld.so.cache`, `ssl/certs`, `alternatives`, `localtime`; no `passwd`,
//!   `shadow` or anything else), a fresh `/proc` of the PID namespace, a
//!   minimal `/dev`, size-capped tmpfs on `/tmp` and `/dev/shm`, and the work
//!   directory on `/sandbox` (the cwd). The root and `/dev` are remounted
//!   read-only so that their tmpfs cannot be filled. The work directory is
//!   `work_root/sbx_…`, mode 0700, owned by the run's uid, holding only the
//!   request's files, and removed after the run; `work_root` is 0711, so no
//!   one can list the other runs' directories.
//! - **Limits.** rlimits set on bwrap before exec and inherited by everything
//!   in the sandbox: `RLIMIT_AS`, `RLIMIT_CPU`, `RLIMIT_FSIZE`,
//!   `RLIMIT_NOFILE`, `RLIMIT_CORE` = 0 and `RLIMIT_NPROC`. NPROC counts the
//!   tasks of a real uid across the host; since every concurrent run has a
//!   uid of its own, it is a per-sandbox bound and contains a fork bomb
//!   without touching other runs or the host. (A pids cgroup would do the
//!   same, but needs a delegated cgroup tree we cannot count on.) Memory is
//!   bounded per process by `RLIMIT_AS`, so a sandbox holds at most
//!   `max_processes × memory_bytes`; the exact bound would be a memory cgroup.
//!   Node.js's WebAssembly reserves more address space than the small tier's
//!   `RLIMIT_AS` and fails there.
//! - **Wall clock.** bwrap runs in its own process group; at the timeout the
//!   group is killed with SIGKILL, bwrap's PID-namespace init dies with it
//!   (`--die-with-parent`) and the kernel kills everything else in the
//!   namespace. Then every process left under the run's uid is killed
//!   (`kill(-1)` as that uid) before the uid is reused.
//! - **Output.** stdout and stderr are read concurrently; the first
//!   `max_output_bytes` of each are kept and the rest is read and discarded,
//!   so a program that writes a lot neither blocks on a full pipe nor grows
//!   our memory, and its exit status stays meaningful; the wall clock bounds
//!   a program that never stops writing. A cut stream ends with the line
//!   `[sgl: stdout truncated at N bytes]`.
//! - **Output files.** After the run, regular files under the work directory
//!   (symlinks and special files skipped, never followed) that are new or
//!   differ from the inputs, in path order, while their total stays within
//!   `max_result_files_bytes`.

/// The path the work directory has inside the sandbox.
pub const SANDBOX_WORK_DIR: &str = "/sandbox";

#[cfg(target_os = "linux")]
pub(crate) use linux::{prepare, run};

#[cfg(not(target_os = "linux"))]
pub(crate) fn prepare(_cfg: &super::SandboxConfig) -> Result<(), super::SandboxError> {
    Err(super::SandboxError::Setup(
        "the sandbox runner needs Linux".into(),
    ))
}

#[cfg(not(target_os = "linux"))]
pub(crate) async fn run(
    _cfg: &super::SandboxConfig,
    _req: super::ExecRequest,
) -> Result<super::ExecOutcome, super::SandboxError> {
    Err(super::SandboxError::Setup(
        "the sandbox runner needs Linux".into(),
    ))
}

/// Appends the truncation marker when the stream was cut.
fn render_output(bytes: &[u8], truncated: bool, name: &str, cap: usize) -> String {
    let mut s = String::from_utf8_lossy(bytes).into_owned();
    if truncated {
        if !s.is_empty() && !s.ends_with('\n') {
            s.push('\n');
        }
        s.push_str(&format!("[sgl: {name} truncated at {cap} bytes]\n"));
    }
    s
}

// The system calls a sandbox needs and std does not offer (rlimits, the
// parent-death signal, fds kept for bwrap, killing a uid's processes), each
// with its safety argument.
#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod linux {
    use std::collections::{BTreeSet, HashMap};
    use std::ffi::OsString;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
    use std::os::unix::process::CommandExt;
    use std::path::{Path, PathBuf};
    use std::process::Stdio;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use rand_core::{OsRng, RngCore};
    use tokio::io::AsyncReadExt;

    use super::super::network::{EgressNs, RESOLV_CONF};
    use super::super::{
        ExecOutcome, ExecRequest, NetworkPolicy, SandboxConfig, SandboxError, SizeLimits, Stack,
    };
    use super::{render_output, SANDBOX_WORK_DIR};

    /// The fd bwrap writes its JSON status to (`--json-status-fd`).
    const STATUS_FD: i32 = 3;
    /// The uid and gid the code sees inside its user namespace.
    const INNER_ID: &str = "1000";
    /// How many uids past `uid_base` concurrent runs may take.
    const UID_RANGE: u32 = 65536;
    /// How long the output pipes may stay open after bwrap exited.
    const DRAIN_GRACE: Duration = Duration::from_secs(2);
    /// Bounds on the walk over the work directory after a run.
    const MAX_WALK_ENTRIES: usize = 10_000;
    const MAX_WALK_DEPTH: usize = 8;

    /// Everything a pool checks and prepares before its first run; refuses
    /// to start where the isolation cannot be had.
    pub(crate) fn prepare(cfg: &SandboxConfig) -> Result<(), SandboxError> {
        check_platform(cfg)?;
        prepare_work_root(&cfg.work_root)?;
        if cfg.network == NetworkPolicy::Egress {
            super::super::network::prepare_egress(cfg)?;
        }
        probe(cfg)
    }

    fn check_platform(cfg: &SandboxConfig) -> Result<(), SandboxError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(SandboxError::Setup(
                "the sandbox runner must run as root: each run gets an unprivileged uid of its own"
                    .into(),
            ));
        }
        if cfg.uid_base == 0
            || cfg
                .uid_base
                .checked_add(UID_RANGE)
                .is_none_or(|end| end > i32::MAX as u32)
        {
            return Err(SandboxError::Setup(format!(
                "uid_base {} leaves no room below 2^31 for {UID_RANGE} unprivileged uids",
                cfg.uid_base
            )));
        }
        for (what, path) in [("python", &cfg.python), ("node", &cfg.node)] {
            let real = std::fs::canonicalize(path)
                .map_err(|e| SandboxError::Setup(format!("{what} at {}: {e}", path.display())))?;
            if !real.starts_with("/usr/") {
                return Err(SandboxError::Setup(format!(
                    "{what} at {} resolves to {}, outside /usr, the only tree the sandbox sees",
                    path.display(),
                    real.display()
                )));
            }
        }
        Ok(())
    }

    /// Makes `work_root` 0711 and checks that the run's uid can reach it:
    /// bwrap, running as that uid, binds the work directory by path.
    fn prepare_work_root(root: &Path) -> Result<(), SandboxError> {
        let setup = |e: String| SandboxError::Setup(format!("work root {}: {e}", root.display()));
        std::fs::DirBuilder::new()
            .recursive(true)
            .create(root)
            .map_err(|e| setup(e.to_string()))?;
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o711))
            .map_err(|e| setup(e.to_string()))?;
        let real = std::fs::canonicalize(root).map_err(|e| setup(e.to_string()))?;
        for dir in real.ancestors().skip(1) {
            let mode = std::fs::metadata(dir)
                .map_err(|e| setup(e.to_string()))?
                .permissions()
                .mode();
            if mode & 0o001 == 0 {
                return Err(setup(format!(
                    "{} is not searchable by other users (mode {:o}); the sandbox uid must be \
                     able to reach the work root",
                    dir.display(),
                    mode & 0o777
                )));
            }
        }
        Ok(())
    }

    /// The unprivileged host uid of one run, unique among the runs of this
    /// process; released (after its processes were killed) on drop.
    struct RunUid {
        uid: u32,
        /// Already swept after the run: nothing of it can be left.
        clean: bool,
    }

    /// The uids held by runs, and where the next search starts.
    struct UidTable {
        taken: BTreeSet<u32>,
        next: u32,
    }

    static TAKEN_UIDS: Mutex<UidTable> = Mutex::new(UidTable {
        taken: BTreeSet::new(),
        next: 0,
    });

    impl RunUid {
        /// Takes uids round-robin over the range rather than the lowest free
        /// one: a uid comes back only after the whole range, long after the
        /// host's init reaped the zombies of its last run (each holds one of
        /// its NPROC slots until then).
        fn take(base: u32) -> Result<Self, SandboxError> {
            let mut table = TAKEN_UIDS
                .lock()
                .map_err(|_| SandboxError::Setup("uid table poisoned".into()))?;
            let start = table.next;
            let offset = (0..UID_RANGE)
                .map(|i| (start + i) % UID_RANGE)
                .find(|o| !table.taken.contains(&(base + o)))
                .ok_or(SandboxError::Busy)?;
            table.next = (offset + 1) % UID_RANGE;
            let uid = base + offset;
            table.taken.insert(uid);
            Ok(RunUid { uid, clean: false })
        }
    }

    impl Drop for RunUid {
        fn drop(&mut self) {
            // Kill whatever is left first (a run cut short by an error or a
            // dropped future): a process of this uid must never outlive the
            // run into the next one.
            if !self.clean {
                kill_all_of(self.uid);
            }
            if let Ok(mut table) = TAKEN_UIDS.lock() {
                table.taken.remove(&self.uid);
            }
        }
    }

    /// Kills every process of `uid` and waits until none is left running;
    /// false when that could not be had within about a second. Zombies are
    /// left to their reaper: bwrap's PID-namespace init is reparented to the
    /// host's init when bwrap exits, which may take seconds to reap it, and a
    /// zombie runs nothing (it only holds one of the uid's NPROC slots).
    fn kill_all_of(uid: u32) -> bool {
        for _ in 0..100 {
            if !has_live_processes(uid) {
                return true;
            }
            if let Sweep::Failed = sweep(uid) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(uid, "processes of a sandbox uid outlived its run");
        false
    }

    /// Whether a process of `uid` exists that is not a zombie: its `/proc`
    /// entry belongs to it. (`kill(-1)` cannot tell: it reports success with
    /// nothing to signal on some kernels.)
    fn has_live_processes(uid: u32) -> bool {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return true;
        };
        entries.flatten().any(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                && e.metadata().is_ok_and(|m| m.uid() == uid)
                && !is_zombie(&e.path())
        })
    }

    /// The state field of `/proc/PID/stat` (after the parenthesised name,
    /// which may itself hold spaces or parentheses) is `Z`.
    fn is_zombie(proc_dir: &Path) -> bool {
        std::fs::read_to_string(proc_dir.join("stat")).is_ok_and(|stat| {
            stat.rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next())
                == Some("Z")
        })
    }

    enum Sweep {
        /// Nothing of the uid was there to signal.
        Empty,
        /// Some were signalled.
        Killed,
        Failed,
    }

    /// One SIGKILL to every process of `uid`, from a child that switched to
    /// that uid, so that `kill(-1)` reaches exactly those processes.
    fn sweep(uid: u32) -> Sweep {
        // SAFETY: between fork and _exit the child only makes
        // async-signal-safe system calls.
        unsafe {
            let pid = libc::fork();
            if pid == 0 {
                let ok = libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(uid) == 0
                    && libc::setuid(uid) == 0;
                let code = if !ok {
                    1
                } else if libc::kill(-1, libc::SIGKILL) == 0 {
                    2
                } else if *libc::__errno_location() == libc::ESRCH {
                    0
                } else {
                    1
                };
                libc::_exit(code);
            }
            if pid < 0 {
                return Sweep::Failed;
            }
            let mut status = 0;
            loop {
                if libc::waitpid(pid, &mut status, 0) == pid {
                    if !libc::WIFEXITED(status) {
                        return Sweep::Failed;
                    }
                    return match libc::WEXITSTATUS(status) {
                        0 => Sweep::Empty,
                        2 => Sweep::Killed,
                        _ => Sweep::Failed,
                    };
                }
                if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                    return Sweep::Failed;
                }
            }
        }
    }

    /// The work directory of one run, removed on drop.
    struct WorkDir {
        path: PathBuf,
    }

    impl Drop for WorkDir {
        fn drop(&mut self) {
            // Never follows symlinks; as root, modes the code set don't stop it.
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    fn setup_err(what: &str, e: impl std::fmt::Display) -> SandboxError {
        SandboxError::Setup(format!("{what}: {e}"))
    }

    /// Creates the work directory with the script and the input files, all
    /// owned by `uid`.
    fn populate(
        dir: &Path,
        uid: u32,
        script: (&str, &[u8]),
        files: &[(String, Vec<u8>)],
    ) -> Result<(), SandboxError> {
        make_dir(dir, uid)?;
        for (name, bytes) in
            std::iter::once(script).chain(files.iter().map(|(n, b)| (n.as_str(), b.as_slice())))
        {
            let rel = Path::new(name);
            let mut at = dir.to_path_buf();
            if let Some(parent) = rel.parent() {
                for part in parent.components() {
                    at.push(part);
                    if !at.is_dir() {
                        make_dir(&at, uid)?;
                    }
                }
            }
            let path = dir.join(rel);
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&path)
                .map_err(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        SandboxError::Invalid(format!("file {name:?} given twice"))
                    } else {
                        setup_err("writing an input file", e)
                    }
                })?;
            f.write_all(bytes)
                .map_err(|e| setup_err("writing an input file", e))?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(uid))
                .map_err(|e| setup_err("chown of an input file", e))?;
        }
        Ok(())
    }

    fn make_dir(path: &Path, uid: u32) -> Result<(), SandboxError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| setup_err("creating the work directory", e))?;
        std::os::unix::fs::chown(path, Some(uid), Some(uid))
            .map_err(|e| setup_err("chown of the work directory", e))
    }

    /// The bwrap arguments, up to and including the program to run.
    fn bwrap_args(
        cfg: &SandboxConfig,
        limits: &SizeLimits,
        work: &Path,
        program: &[OsString],
    ) -> Vec<OsString> {
        fn push(a: &mut Vec<OsString>, items: &[&str]) {
            a.extend(items.iter().map(OsString::from));
        }
        let mut a: Vec<OsString> = Vec::with_capacity(96);
        push(
            &mut a,
            &[
                "--unshare-user",
                "--unshare-pid",
                "--unshare-ipc",
                "--unshare-uts",
                "--unshare-cgroup-try",
                "--disable-userns",
                "--uid",
                INNER_ID,
                "--gid",
                INNER_ID,
                "--hostname",
                "sandbox",
                "--die-with-parent",
                "--new-session",
                "--cap-drop",
                "ALL",
                "--clearenv",
                "--setenv",
                "PATH",
                "/usr/bin:/bin",
                "--setenv",
                "HOME",
                "/tmp",
                "--setenv",
                "TMPDIR",
                "/tmp",
                "--setenv",
                "LANG",
                "C.UTF-8",
            ],
        );
        match cfg.network {
            NetworkPolicy::None => push(&mut a, &["--unshare-net"]),
            NetworkPolicy::Egress => {
                // The namespace bwrap was started in (see `command`); the
                // resolver there is pasta's DNS forwarder.
                a.push("--ro-bind".into());
                a.push(cfg.work_root.join(RESOLV_CONF).into_os_string());
                a.push("/etc/resolv.conf".into());
            }
        }
        push(&mut a, &["--ro-bind", "/usr", "/usr"]);
        for top in ["bin", "lib", "lib64", "lib32", "libx32", "sbin"] {
            let host = format!("/{top}");
            match std::fs::read_link(&host) {
                Ok(target) => {
                    if let Some(t) = target.to_str() {
                        push(&mut a, &["--symlink", t, host.as_str()]);
                    }
                }
                Err(_) if Path::new(&host).is_dir() => {
                    push(&mut a, &["--ro-bind", host.as_str(), host.as_str()])
                }
                Err(_) => {}
            }
        }
        for etc in [
            "/etc/ld.so.cache",
            "/etc/ssl/certs",
            "/etc/ssl/openssl.cnf",
            "/etc/ca-certificates",
            "/etc/alternatives",
            "/etc/localtime",
        ] {
            push(&mut a, &["--ro-bind-try", etc, etc]);
        }
        let tmp_size = limits.max_file_bytes.to_string();
        push(
            &mut a,
            &[
                "--proc", "/proc", "--dev", "/dev", "--size", &tmp_size, "--tmpfs", "/tmp",
                "--size", &tmp_size, "--tmpfs", "/dev/shm",
            ],
        );
        a.push("--bind".into());
        a.push(work.as_os_str().to_owned());
        a.push(SANDBOX_WORK_DIR.into());
        push(
            &mut a,
            &[
                "--remount-ro",
                "/dev",
                "--remount-ro",
                "/",
                "--chdir",
                SANDBOX_WORK_DIR,
                "--json-status-fd",
                "3",
                "--",
            ],
        );
        a.extend(program.iter().cloned());
        a
    }

    fn program(cfg: &SandboxConfig, stack: Stack) -> Vec<OsString> {
        match stack {
            // -u: unbuffered, so output written before a timeout is kept;
            // -B: no __pycache__ among the output files; -s: no user site.
            Stack::Python => vec![
                cfg.python.clone().into(),
                "-u".into(),
                "-B".into(),
                "-s".into(),
                stack.script_name().into(),
            ],
            Stack::Node => vec![cfg.node.clone().into(), stack.script_name().into()],
        }
    }

    /// The bwrap command for one run, ready to spawn: in the run's egress
    /// network namespace when it has one, uid switched, rlimits set, fds
    /// other than stdio and the status pipe closed at exec.
    fn command(
        cfg: &SandboxConfig,
        limits: &SizeLimits,
        uid: u32,
        work: &Path,
        program: &[OsString],
        status_w: i32,
        netns: Option<i32>,
    ) -> std::process::Command {
        let mut cmd = std::process::Command::new(&cfg.bwrap);
        cmd.args(bwrap_args(cfg, limits, work, program))
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let rl = [
            (libc::RLIMIT_AS, limits.memory_bytes),
            (libc::RLIMIT_CPU, limits.cpu_seconds),
            (libc::RLIMIT_NPROC, limits.max_processes),
            (libc::RLIMIT_FSIZE, limits.max_file_bytes),
            (libc::RLIMIT_NOFILE, limits.max_open_files),
            (libc::RLIMIT_CORE, 0),
        ];
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls; it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                // bwrap dies with us; --die-with-parent carries it inward.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Joining a namespace needs root, so it comes before the
                // switch to the run's uid, which is therefore made here and
                // not with Command::uid (std switches before pre_exec).
                if let Some(fd) = netns {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                for (res, v) in rl {
                    // Never above the hard limit we were given: lowering is
                    // all an unprivileged process may do.
                    let mut cur = libc::rlimit {
                        rlim_cur: 0,
                        rlim_max: 0,
                    };
                    if libc::getrlimit(res, &mut cur) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let v: libc::rlim_t = v;
                    let v = v.min(cur.rlim_max);
                    let lim = libc::rlimit {
                        rlim_cur: v,
                        rlim_max: v,
                    };
                    if libc::setrlimit(res, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if status_w == STATUS_FD {
                    if libc::fcntl(STATUS_FD, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(status_w, STATUS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Nothing else of this process may leak into the sandbox.
                if libc::syscall(
                    libc::SYS_close_range,
                    (STATUS_FD + 1) as libc::c_uint,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd
    }

    /// A pipe for bwrap's JSON status: (read end, non-blocking; write end).
    fn status_pipe() -> Result<(OwnedFd, OwnedFd), SandboxError> {
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(SandboxError::Io(std::io::Error::last_os_error()));
        }
        // SAFETY: pipe2 returned two fresh fds we now own.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((r, w))
    }

    /// What bwrap's status said: whether the program was started, and its
    /// exit code once known.
    fn read_status(r: OwnedFd) -> (bool, Option<i32>) {
        let mut f = std::fs::File::from(r);
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        // Non-blocking: bwrap has exited, whatever it wrote is there.
        while buf.len() < 64 * 1024 {
            match f.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let mut started = false;
        let mut exit = None;
        for v in serde_json::Deserializer::from_slice(&buf)
            .into_iter::<serde_json::Value>()
            .map_while(Result::ok)
        {
            started |= v.get("child-pid").is_some();
            if let Some(c) = v.get("exit-code").and_then(|c| c.as_i64()) {
                exit = i32::try_from(c).ok();
            }
        }
        (started, exit)
    }

    /// The first `cap` bytes of a stream, and whether more came.
    #[derive(Default)]
    struct Captured {
        bytes: Vec<u8>,
        truncated: bool,
    }

    async fn capture<R: tokio::io::AsyncRead + Unpin>(
        mut r: R,
        cap: usize,
        into: Arc<Mutex<Captured>>,
    ) {
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            let n = match r.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let Ok(mut c) = into.lock() else { return };
            let room = cap.saturating_sub(c.bytes.len());
            let keep = n.min(room);
            c.bytes.extend_from_slice(&chunk[..keep]);
            if keep < n {
                // Keep reading and discarding: the program is not blocked on
                // a full pipe and our memory stays at `cap`.
                c.truncated = true;
            }
        }
    }

    fn take_captured(c: &Arc<Mutex<Captured>>) -> Captured {
        c.lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default()
    }

    /// Runs one request; see the module documentation.
    pub(crate) async fn run(
        cfg: &SandboxConfig,
        req: ExecRequest,
    ) -> Result<ExecOutcome, SandboxError> {
        let limits = cfg.limits_for(req.size).clone();
        let script = req.stack.script_name();
        if req.files.iter().any(|(n, _)| n == script) {
            return Err(SandboxError::Invalid(format!(
                "{script} is the name of the program itself"
            )));
        }
        if let Some((bad, _)) = req
            .files
            .iter()
            .find(|(n, _)| !super::super::valid_file_name(n))
        {
            return Err(SandboxError::Invalid(format!("bad file name {bad:?}")));
        }
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        let sandbox_id = format!("sbx_{}", hex::encode(id));

        let mut uid = RunUid::take(cfg.uid_base)?;
        let work = WorkDir {
            path: cfg.work_root.join(&sandbox_id),
        };
        let req = Arc::new(req);
        {
            let (path, req, u) = (work.path.clone(), req.clone(), uid.uid);
            tokio::task::spawn_blocking(move || {
                populate(&path, u, (script, req.code.as_bytes()), &req.files)
            })
            .await
            .map_err(|e| setup_err("setup task", e))??;
        }

        let netns = egress_ns(cfg, &sandbox_id).await?;
        let (status_r, status_w) = status_pipe()?;
        let std_cmd = command(
            cfg,
            &limits,
            uid.uid,
            &work.path,
            &program(cfg, req.stack),
            status_w.as_raw_fd(),
            netns
                .as_ref()
                .and_then(|n| n.fd.as_ref())
                .map(|f| f.as_raw_fd()),
        );
        let mut cmd = tokio::process::Command::from(std_cmd);
        cmd.kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().map_err(|e| setup_err("starting bwrap", e))?;
        drop(status_w);
        let pgid = child.id();

        let out = Arc::new(Mutex::new(Captured::default()));
        let err = Arc::new(Mutex::new(Captured::default()));
        let out_task = child
            .stdout
            .take()
            .map(|s| tokio::spawn(capture(s, limits.max_output_bytes, out.clone())));
        let err_task = child
            .stderr
            .take()
            .map(|s| tokio::spawn(capture(s, limits.max_output_bytes, err.clone())));

        let (status, timed_out) = match tokio::time::timeout(req.timeout, child.wait()).await {
            Ok(s) => (s?, false),
            Err(_) => {
                if let Some(pg) = pgid.and_then(|p| i32::try_from(p).ok()) {
                    // SAFETY: kill has no memory preconditions.
                    unsafe { libc::kill(-pg, libc::SIGKILL) };
                }
                let _ = child.start_kill();
                (child.wait().await?, true)
            }
        };
        let elapsed = started.elapsed();

        // Everything of the run's uid dies before its outputs are read.
        {
            let u = uid.uid;
            uid.clean = tokio::task::spawn_blocking(move || kill_all_of(u))
                .await
                .unwrap_or(false);
        }
        if let Some(ns) = netns {
            // `ip netns delete` is a process: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || drop(ns)).await;
        }
        for task in [out_task, err_task].into_iter().flatten() {
            let abort = task.abort_handle();
            if tokio::time::timeout(DRAIN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        let (launched, json_exit) = read_status(status_r);
        let out = take_captured(&out);
        let err = take_captured(&err);
        if !launched && !timed_out {
            let msg = String::from_utf8_lossy(&err.bytes);
            return Err(SandboxError::Setup(format!(
                "bwrap failed ({status}): {}",
                msg.trim()
            )));
        }
        let exit_code = match (timed_out, json_exit) {
            (false, Some(c)) => c,
            _ => status
                .code()
                .or_else(|| {
                    use std::os::unix::process::ExitStatusExt;
                    status.signal().map(|s| 128 + s)
                })
                .unwrap_or(-1),
        };

        let inputs: HashMap<String, Vec<u8>> =
            std::iter::once((script.to_string(), req.code.clone().into_bytes()))
                .chain(req.files.iter().cloned())
                .collect();
        let (path, cap) = (work.path.clone(), limits.max_result_files_bytes);
        let (files, files_truncated) =
            tokio::task::spawn_blocking(move || collect_outputs(&path, &inputs, cap))
                .await
                .map_err(|e| setup_err("collect task", e))?;
        drop(work);
        drop(uid);

        let cap = limits.max_output_bytes;
        Ok(ExecOutcome {
            sandbox_id,
            stdout: render_output(&out.bytes, out.truncated, "stdout", cap),
            stderr: render_output(&err.bytes, err.truncated, "stderr", cap),
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            exit_code,
            timed_out,
            execution_time_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
            files,
            files_truncated,
        })
    }

    /// The network namespace of a run under `egress`; none under `none`
    /// (bwrap makes an empty one).
    async fn egress_ns(cfg: &SandboxConfig, tag: &str) -> Result<Option<EgressNs>, SandboxError> {
        if cfg.network != NetworkPolicy::Egress {
            return Ok(None);
        }
        let (cfg, tag) = (cfg.clone(), tag.to_owned());
        tokio::task::spawn_blocking(move || EgressNs::create(&cfg, &tag).map(Some))
            .await
            .map_err(|e| setup_err("egress task", e))?
    }

    /// New or changed regular files under `root`, within `cap` bytes in all.
    fn collect_outputs(
        root: &Path,
        inputs: &HashMap<String, Vec<u8>>,
        cap: usize,
    ) -> (Vec<(String, Vec<u8>)>, bool) {
        let mut found = Vec::new();
        let mut budget = MAX_WALK_ENTRIES;
        let mut truncated = walk(root, "", 0, &mut budget, &mut found);
        found.sort();
        let mut files = Vec::new();
        let mut total = 0usize;
        for (name, len) in found {
            if let Some(orig) = inputs.get(&name) {
                if orig.len() as u64 == len
                    && read_file(&root.join(&name), len).as_deref() == Some(orig.as_slice())
                {
                    continue;
                }
            }
            let Ok(len) = usize::try_from(len) else {
                truncated = true;
                continue;
            };
            if total.saturating_add(len) > cap {
                truncated = true;
                continue;
            }
            match read_file(&root.join(&name), len as u64) {
                Some(bytes) => {
                    total += bytes.len();
                    files.push((name, bytes));
                }
                None => truncated = true,
            }
        }
        (files, truncated)
    }

    /// Lists regular files (relative name, size) without following
    /// symlinks; returns true when the walk was cut short.
    fn walk(
        dir: &Path,
        prefix: &str,
        depth: usize,
        budget: &mut usize,
        found: &mut Vec<(String, u64)>,
    ) -> bool {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return true;
        };
        let mut cut = false;
        for entry in entries {
            let Ok(entry) = entry else {
                cut = true;
                continue;
            };
            if *budget == 0 {
                return true;
            }
            *budget -= 1;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                cut = true;
                continue;
            };
            let rel = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}/{name}")
            };
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            if meta.is_file() {
                found.push((rel, meta.size()));
            } else if meta.is_dir() {
                if depth + 1 >= MAX_WALK_DEPTH {
                    cut = true;
                } else {
                    cut |= walk(&entry.path(), &rel, depth + 1, budget, found);
                }
            }
        }
        cut
    }

    /// Reads a regular file without following a symlink, at most `len`
    /// bytes (more means it changed, which a dead sandbox cannot do).
    fn read_file(path: &Path, len: u64) -> Option<Vec<u8>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
            .ok()?;
        if !f.metadata().ok()?.is_file() {
            return None;
        }
        let mut buf = Vec::with_capacity(usize::try_from(len).ok()?);
        f.take(len).read_to_end(&mut buf).ok()?;
        Some(buf)
    }

    /// Runs `true` in a sandbox once, so that a host where bwrap cannot set
    /// up its namespaces fails at start, not on the first paid request.
    fn probe(cfg: &SandboxConfig) -> Result<(), SandboxError> {
        let limits = cfg.limits_for(super::super::Size::Small).clone();
        let uid = RunUid::take(cfg.uid_base)?;
        let mut id = [0u8; 8];
        OsRng.fill_bytes(&mut id);
        let work = WorkDir {
            path: cfg.work_root.join(format!("probe_{}", hex::encode(id))),
        };
        make_dir(&work.path, uid.uid)?;
        let netns = match cfg.network {
            NetworkPolicy::None => None,
            NetworkPolicy::Egress => {
                Some(EgressNs::create(cfg, &format!("probe{}", hex::encode(id)))?)
            }
        };
        let (status_r, status_w) = status_pipe()?;
        let out = command(
            cfg,
            &limits,
            uid.uid,
            &work.path,
            &[cfg.python.clone().into(), "-c".into(), "pass".into()],
            status_w.as_raw_fd(),
            netns
                .as_ref()
                .and_then(|n| n.fd.as_ref())
                .map(|f| f.as_raw_fd()),
        )
        .output()
        .map_err(|e| setup_err("starting bwrap", e))?;
        drop(status_w);
        let (launched, exit) = read_status(status_r);
        if !launched || exit != Some(0) {
            return Err(SandboxError::Setup(format!(
                "bwrap cannot start a sandbox here ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::render_output;

    #[test]
    fn truncation_marker() {
        assert_eq!(render_output(b"ab", false, "stdout", 2), "ab");
        assert_eq!(
            render_output(b"ab", true, "stdout", 2),
            "ab\n[sgl: stdout truncated at 2 bytes]\n"
        );
    }
}
