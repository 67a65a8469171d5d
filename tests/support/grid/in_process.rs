//! A coordinator and node agents inside the test process, on loopback
//! sockets: the same code the binary runs, with the echo load-test engine
//! (token counts then known exactly) and no process start-up.

#[cfg(feature = "node")]
use std::sync::Arc;
use std::time::Duration;

use sgl::coordinator::{self, Config};
#[cfg(feature = "node")]
use sgl::node::agent::{self, AgentConfig, AgentError};
#[cfg(feature = "node")]
use sgl::node::executor::EchoExecutor;
use sgl::node::identity_files::{self, InitOptions};
use sgl::store::Store;
#[cfg(feature = "node")]
use tokio::sync::oneshot;
#[cfg(feature = "node")]
use tokio::task::JoinHandle;

#[cfg(feature = "node")]
use super::MODEL;
use super::OPERATOR;

/// A coordinator without a store on 127.0.0.1:0, running until the test
/// ends; its base URL.
pub async fn coordinator(config: Config) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(coordinator::run(config, listener, std::future::pending()));
    format!("http://{addr}")
}

/// A single-use registration code for `wallet`, as `sgl coordinator nodes
/// invite` makes it.
pub async fn invite(store: &Store, wallet: &str) -> String {
    let code = format!("sglreg_{}", coordinator::state::random_token());
    let hash = hex::encode(coordinator::state::secret_hash(&code));
    store.create_registration_code(&hash, wallet).await.unwrap();
    code
}

/// A fresh node identity for the coordinator at `base` (operator wallet
/// OPERATOR, no TEE).
pub fn node_dir(base: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    identity_files::init(
        dir.path(),
        &InitOptions {
            force: false,
            wallet_address: Some(OPERATOR.into()),
            tee_type: "none".into(),
            coordinator_url: base.into(),
        },
    )
    .unwrap();
    dir
}

/// The heartbeat the in-process agents use: fast, so tests wait little.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(100);

/// A node agent running the echo engine (model MODEL, four slots) from its
/// identity directory. Dropping it shuts the agent down.
#[cfg(feature = "node")]
pub struct Agent {
    pub dir: tempfile::TempDir,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), AgentError>>,
}

#[cfg(feature = "node")]
impl Agent {
    /// Start the agent on `dir`; `configure` adjusts its config (heartbeat,
    /// WebSocket, registration code, drain timeout).
    pub fn spawn(dir: tempfile::TempDir, configure: impl FnOnce(&mut AgentConfig)) -> Agent {
        Self::spawn_with(dir, Arc::new(EchoExecutor::new(MODEL, 4)), configure)
    }

    /// [`Agent::spawn`] with another executor (the real engine).
    pub fn spawn_with(
        dir: tempfile::TempDir,
        executor: Arc<dyn sgl::node::executor::Executor>,
        configure: impl FnOnce(&mut AgentConfig),
    ) -> Agent {
        let mut cfg = AgentConfig::new(dir.path().to_path_buf());
        configure(&mut cfg);
        let (stop, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(agent::run(cfg, executor, None, async move {
            let _ = rx.await;
        }));
        Agent { dir, stop, task }
    }

    /// Shut the agent down as SIGTERM would and check that it left cleanly;
    /// its identity directory, to start it again.
    pub async fn stop(self) -> tempfile::TempDir {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        self.dir
    }
}
