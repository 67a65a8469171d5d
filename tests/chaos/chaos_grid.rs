//! A development coordinator and an echo node as child processes, for the
//! chaos tests: the echo engine answers without a model, pausing before each
//! token when asked, so a stream is certain to outlast a fault.
#![cfg(all(feature = "coordinator", unix))]
#![allow(dead_code)]

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};
use sgl::node::identity_files;

use crate::grid_support::{
    free_port, node_init, node_start, wait_online, wait_until, CoordinatorProc, Proc, MODEL,
    OPERATOR, SGL,
};

/// A coordinator, an echo node attached to it, and the node's directory.
pub struct EchoGrid {
    pub coordinator: CoordinatorProc,
    pub node: Proc,
    pub dir: tempfile::TempDir,
    pub base: String,
}

impl EchoGrid {
    /// What the node has logged so far.
    pub fn node_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    /// `sgl coordinator serve --dev --database-url DB COORD…` and `sgl node
    /// start --engine echo NODE…`, waited for until the node takes work.
    pub async fn start(db: &str, coordinator_args: &[&str], node_args: &[&str]) -> EchoGrid {
        let mut args = vec!["--database-url", db];
        args.extend_from_slice(coordinator_args);
        let coordinator = CoordinatorProc::start(&args);
        Self::with(coordinator, node_args).await
    }

    /// The same with a coordinator already started.
    pub async fn with(coordinator: CoordinatorProc, node_args: &[&str]) -> EchoGrid {
        let base = coordinator.base.clone();
        let dir = tempfile::tempdir().unwrap();
        let nd = dir.path().join("node");
        let nd = nd.to_str().unwrap();
        node_init(nd, &base, OPERATOR);
        let mut args = vec!["--engine", "echo", "--model", MODEL];
        args.extend_from_slice(node_args);
        // The node's log is kept beside it, for a failing test to show.
        let log = std::fs::File::create(dir.path().join("node.log")).unwrap();
        let node = node_start(nd, &args, Stdio::from(log));
        wait_online(&base, Duration::from_secs(60)).await;
        EchoGrid {
            coordinator,
            node,
            dir,
            base,
        }
    }

    /// The node's id and bearer token, as saved in its node.json.
    pub fn node_credentials(&self) -> (String, String) {
        let file = identity_files::load_node_file(&self.dir.path().join("node")).unwrap();
        (file.node_id.unwrap(), file.auth_token.unwrap())
    }
}

/// `sgl coordinator serve --dev ARGS` (ARGS name the store) with its
/// open-file limit (soft and hard) lowered to `files` by the shell's
/// `ulimit`.
pub fn coordinator_with_file_limit(files: u32, args: &[&str]) -> CoordinatorProc {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let script = format!("ulimit -n {files} && exec \"$0\" \"$@\"");
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, SGL])
        .args([
            "coordinator",
            "serve",
            "--dev",
            "--listen",
            &listen,
            "--heartbeat-interval",
            "1",
        ])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let proc = Proc(cmd.spawn().unwrap());
    wait_until("the coordinator to listen", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    CoordinatorProc {
        base: format!("http://{listen}"),
        proc,
    }
}

/// Run `body` on each store a coordinator process can use: a SQLite file,
/// then PostgreSQL (skipped when unreachable unless SGL_REQUIRE_POSTGRES=1;
/// see `pay_common::stores::cli_databases`). `body` gets the database URL.
pub async fn on_each_store<F, Fut>(tag: &str, body: F)
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let dir = tempfile::tempdir().unwrap();
    for db in crate::pay_common::stores::cli_databases(tag, dir.path()) {
        eprintln!("backend: {}", db.backend);
        body(db.url.clone()).await;
    }
}

/// A plain (OpenAI-mode) chat body: the echo engine repeats `words` words
/// of the prompt back, one token each.
pub fn plain_chat(words: usize, stream: bool) -> Value {
    let prompt: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
    json!({"model": MODEL, "messages": [{"role": "user", "content": prompt.join(" ")}],
           "max_tokens": words, "stream": stream})
}

/// POST a plain chat; the response.
pub async fn post_chat(http: &reqwest::Client, base: &str, body: &Value) -> reqwest::Response {
    http.post(format!("{base}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
}

/// Read a stream until its text contains `needle`; all of it so far.
pub async fn read_until(resp: &mut reqwest::Response, needle: &str) -> String {
    let mut seen = String::new();
    while !seen.contains(needle) {
        let chunk = tokio::time::timeout(Duration::from_secs(30), resp.chunk())
            .await
            .expect("the stream stalled")
            .unwrap()
            .unwrap_or_else(|| panic!("the stream ended before {needle:?}: {seen}"));
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    seen
}

/// `GET /grid/capacity`.
pub async fn capacity(base: &str) -> Value {
    reqwest::get(format!("{base}/grid/capacity"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
