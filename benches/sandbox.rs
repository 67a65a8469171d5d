//! The overhead of a code sandbox: `print(1)` end to end through
//! `SandboxPool` (work directory, uid, bwrap, namespaces, rlimits, capture,
//! output collection, cleanup), p50/p99 over N runs, against its parts:
//!
//! - `python3 -c 'print(1)'` run directly (the interpreter's own start),
//! - the pool with `/usr/bin/true` as the interpreter (the sandbox alone),
//! - plain `bwrap … true` with the same kind of namespaces (bwrap alone),
//! - `print(1)` under the `egress` network policy (a namespace, pasta and
//!   its rules per run), where pasta and ip are installed.
//!
//! `cargo bench --features compute-plane --bench sandbox` (as root, with
//! bubblewrap installed; `--profile test` reuses the test build).
//! SGL_BENCH_N sets the number of runs (default 100).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sgl::compute::exec::{ExecRequest, NetworkPolicy, SandboxConfig, SandboxPool, Size, Stack};

fn runs() -> usize {
    std::env::var("SGL_BENCH_N")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100)
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let pct = |p: f64| {
        let i = ((samples.len() as f64 - 1.0) * p).round() as usize;
        samples[i].as_secs_f64() * 1e3
    };
    let mean = samples.iter().map(Duration::as_secs_f64).sum::<f64>() / samples.len() as f64;
    println!(
        "{what:<52} n={:<4} p50 {:>7.2} ms  p99 {:>7.2} ms  mean {:>7.2} ms",
        samples.len(),
        pct(0.5),
        pct(0.99),
        mean * 1e3
    );
}

fn time_command(n: usize, mut make: impl FnMut() -> Command) -> Vec<Duration> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let out = make().stdin(Stdio::null()).output().expect("spawn");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            t.elapsed()
        })
        .collect()
}

async fn time_pool(n: usize, pool: &SandboxPool, code: &str) -> Vec<Duration> {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let req = ExecRequest {
            stack: Stack::Python,
            size: Size::Small,
            timeout: Duration::from_secs(30),
            code: code.to_owned(),
            files: Vec::new(),
        };
        let t = Instant::now();
        let out = pool
            .acquire()
            .await
            .expect("slot")
            .run(req)
            .await
            .expect("run");
        samples.push(t.elapsed());
        assert_eq!(out.exit_code, 0, "{}", out.stderr);
    }
    samples
}

#[tokio::main]
async fn main() {
    let n = runs();
    let root = tempfile::tempdir().expect("temp dir");
    let cfg = SandboxConfig::new(root.path().join("py"));
    let python = cfg.python.clone();
    let pool = match SandboxPool::new(cfg.clone()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sandbox unavailable, nothing measured: {e}");
            return;
        }
    };
    let mut egress = cfg.clone();
    egress.network = NetworkPolicy::Egress;
    egress.work_root = root.path().join("egress");
    let mut bare = cfg;
    bare.python = "/usr/bin/true".into();
    bare.work_root = root.path().join("true");
    let bare = SandboxPool::new(bare).expect("pool with /usr/bin/true");

    // Warm the page cache and the interpreter's files.
    let _ = time_pool(3, &pool, "print(1)").await;

    report(
        "python3 -c 'print(1)' directly",
        time_command(n, || {
            let mut c = Command::new(&python);
            c.args(["-c", "print(1)"]);
            c
        }),
    );
    report(
        "bwrap (namespaces, /usr, /proc, /dev, /tmp) true",
        time_command(n, || {
            let mut c = Command::new("/usr/bin/bwrap");
            c.args([
                "--unshare-all",
                "--die-with-parent",
                "--new-session",
                "--ro-bind",
                "/usr",
                "/usr",
                "--symlink",
                "usr/lib64",
                "/lib64",
                "--symlink",
                "usr/lib",
                "/lib",
                "--proc",
                "/proc",
                "--dev",
                "/dev",
                "--tmpfs",
                "/tmp",
                "/usr/bin/true",
            ]);
            c
        }),
    );
    report(
        "SandboxPool, interpreter /usr/bin/true",
        time_pool(n, &bare, "").await,
    );
    report(
        "SandboxPool print(1) end to end",
        time_pool(n, &pool, "print(1)").await,
    );
    match SandboxPool::new(egress) {
        Ok(egress) => report(
            "SandboxPool print(1) end to end, network egress",
            time_pool(n, &egress, "print(1)").await,
        ),
        Err(e) => eprintln!("egress unavailable, not measured: {e}"),
    }
}
