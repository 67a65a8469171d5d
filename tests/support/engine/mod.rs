//! Shared by the engine, server and SDK tests: finding the real model and
//! running `sgl node serve` as a child process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL_ID: &str = "smollm2-135m";

/// The Qwen2-architecture catalogue model, the second family under test.
pub const QWEN2_MODEL_ID: &str = "qwen2.5-coder-0.5b";

/// The cached SmolLM2 GGUF, or `None` (with the reason printed) when it is not
/// there. With SGL_REQUIRE_MODEL=1 a missing model fails the test instead.
pub fn model_path() -> Option<PathBuf> {
    catalogue_model_path(MODEL_ID)
}

/// The cached GGUF of a catalogue model, as [`model_path`] for SmolLM2.
pub fn catalogue_model_path(id: &str) -> Option<PathBuf> {
    match sgl::node::model_cache::resolve(id) {
        Ok(m) => Some(m.path),
        Err(e) => {
            if std::env::var("SGL_REQUIRE_MODEL").as_deref() == Ok("1") {
                panic!("SGL_REQUIRE_MODEL=1 but the model is missing: {e}");
            }
            eprintln!("skipping: {e} (run `sgl model fetch {id}`)");
            None
        }
    }
}

/// A running `sgl node serve`; killed on drop.
pub struct Server {
    pub child: Child,
    pub base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Start the server on a free loopback port and wait until it answers
    /// /health with 200.
    pub async fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sgl"))
            .args(["node", "serve", "--model", MODEL_ID, "--port", "0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn sgl node serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read the listening line");
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let server = Server { child, base };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = client.get(format!("{}/health", server.base)).send().await;
            if let Ok(r) = r {
                if r.status() == 200 {
                    break;
                }
                assert_eq!(r.status(), 503, "health while loading");
            }
            assert!(Instant::now() < deadline, "server did not become healthy");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        server
    }
}
