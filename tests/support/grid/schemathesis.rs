//! schemathesis run against a server's `/openapi.json`: the stateless
//! phases and the checks every fuzzing test asserts (no 5xx, every status
//! and content type documented, every JSON body of its schema).

use std::process::Stdio;
use std::time::{Duration, Instant};

use super::python;

/// Whether schemathesis runs here: skipped with a message when not, unless
/// SGL_REQUIRE_PY_CLIENTS=1.
pub fn have_schemathesis() -> bool {
    super::python_has("schemathesis")
}

/// Run schemathesis against `base` with `headers` (`Name: value`) and
/// `extra` arguments (an operation filter, a smaller `--max-examples`);
/// fails the test with its report when it finds anything. Returns how long
/// it ran.
pub async fn schemathesis(base: &str, headers: &[String], extra: &[&str]) -> Duration {
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new(python());
    cmd.args(["-m", "schemathesis.cli", "run"])
        .arg(format!("{base}/openapi.json"))
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,\
             response_schema_conformance",
        ])
        // One worker: with two, hypothesis parses lambda sources from two
        // threads, and CPython 3.11's ast module then fails at random with
        // "AST constructor recursion depth mismatch", a runtime error of
        // the tool that reads as a finding.
        .args(["--workers", "1"])
        .args(["--request-timeout", "30", "--no-color"])
        // Only the credentials given here: a generated payment header would
        // send the coordinator to a facilitator.
        .args(["--generation-with-security-parameters", "false"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if !extra.contains(&"--max-examples") {
        cmd.args(["--max-examples", "25"]);
    }
    cmd.args(extra);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = tokio::time::timeout(Duration::from_secs(600), cmd.output())
        .await
        .expect("schemathesis ran for more than ten minutes")
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let took = started.elapsed();
    println!("{stdout}\n{stderr}\nschemathesis against {base}: {took:?}");
    assert!(
        out.status.success(),
        "schemathesis found failures against {base}:\n{stdout}\n{stderr}"
    );
    took
}
