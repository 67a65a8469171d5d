//! A loopback TCP relay in front of one upstream (the test PostgreSQL),
//! for a network cut between one coordinator replica and its database:
//! [`Relay::cut`] closes every connection it carries and closes each new
//! one at once, as a database that went away would; [`Relay::restore`]
//! carries connections again on the same port.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct Relay {
    /// The loopback port to connect to instead of the upstream's.
    pub port: u16,
    cut: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.close_all();
    }
}

impl Relay {
    /// Listen on a free loopback port, relaying to `upstream` (host:port).
    pub async fn start(upstream: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<AbortHandle>>> = Arc::default();
        let upstream = upstream.to_string();
        let task = {
            let (cut, conns) = (cut.clone(), conns.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        continue;
                    };
                    // Under the lock, so that a cut either sees this
                    // connection or this one sees the cut.
                    let mut c = conns.lock().unwrap();
                    if cut.load(Ordering::SeqCst) {
                        // Dropped: the client sees its connection close.
                        continue;
                    }
                    let upstream = upstream.clone();
                    let h = tokio::spawn(async move {
                        let Ok(mut server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    });
                    c.retain(|h| !h.is_finished());
                    c.push(h.abort_handle());
                }
            })
        };
        Relay {
            port,
            cut,
            conns,
            task,
        }
    }

    /// Cut the database off: every carried connection closes, and so does
    /// each new one.
    pub fn cut(&self) {
        let mut c = self.conns.lock().unwrap();
        self.cut.store(true, Ordering::SeqCst);
        for h in c.drain(..) {
            h.abort();
        }
    }

    /// Carry connections again.
    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    fn close_all(&self) {
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }
}
