//! schemathesis against the compute plane of a real coordinator: `sgl
//! coordinator serve --dev` with both Machines API providers on their
//! loopback stand-ins (and code execution where the sandbox runs), an API
//! key holding credits, fuzzing from its `/openapi.json` only the compute
//! operations (`/compute/…`, `/api/x402/compute`): no 5xx, every status
//! and content type documented, every JSON body of its schema. The grid
//! tests' coordinator runs without the compute plane, where these routes
//! only answer 404.

use crate::compute_support::start_both;
use crate::exec_process::sandbox_available;
use crate::grid_support::schemathesis::{have_schemathesis, schemathesis};
use crate::grid_support::{free_port, funded_api_key};
use crate::machines_process::coordinator;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_on_the_compute_plane() {
    if !have_schemathesis() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("coordinator.db");
    let db = db.to_str().unwrap();
    let key = funded_api_key(db, "0x3400000000000000000000000000000000000034", "50");
    let (vultr, dig) = start_both().await;

    // Code execution too where bubblewrap runs: its own work root (apart
    // from `dir`, whose 0700 the sandbox's uid could not pass) and a uid
    // range apart from the other tests' (leftovers are killed by uid).
    let work = tempfile::tempdir().unwrap();
    let uid_base = (1_000_000_000u32
        + (rand_core::RngCore::next_u32(&mut rand_core::OsRng) % 12_000) * 65_536)
        .to_string();
    let mut extra = vec!["--dev"];
    let exec = sandbox_available();
    if exec {
        extra.extend([
            "--code-exec",
            "--code-exec-work-dir",
            work.path().to_str().unwrap(),
            "--code-exec-uid-base",
            &uid_base,
        ]);
    }
    let port = free_port();
    let _c = coordinator(db, port, &vultr, &dig, &extra);
    let base = format!("http://127.0.0.1:{port}");

    let paths = if exec {
        "^/compute/|^/api/x402/compute$"
    } else {
        "^/compute/"
    };
    let auth = format!("Authorization: Bearer {key}");
    let took = schemathesis(
        &base,
        &[auth],
        &["--include-path-regex", paths, "--max-examples", "10"],
    )
    .await;
    println!("compute plane fuzzed in {took:?}");
}
