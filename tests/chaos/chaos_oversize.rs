//! Oversize prompts: a sealed ciphertext over 524,288 base58 characters, a
//! plain body over the limit and a plain prompt whose sealed form would be
//! over it are refused with 413 before any base58 work; the largest prompts
//! allowed are sealed and opened off the async threads. Meanwhile a normal
//! client keeps its latency under a second.
#![cfg(all(feature = "coordinator", unix))]

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sgl::proto::e2e::{ALG_V2, MAX_CIPHERTEXT_CHARS};

use crate::chaos_grid::{on_each_store, plain_chat, post_chat, EchoGrid};
use crate::grid_support::MODEL;

/// A plain chat whose user message is `bytes` long (words of the echo).
fn big_plain(bytes: usize) -> Value {
    let mut content = String::with_capacity(bytes + 8);
    let mut i = 0u64;
    while content.len() < bytes {
        content.push_str(&format!("w{i} "));
        i += 1;
    }
    content.truncate(bytes);
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}],
           "max_tokens": 8192})
}

/// Send `request` on a fresh connection; what comes back until the server
/// closes it or 10 s pass.
async fn raw_exchange(base: &str, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    if String::from_utf8_lossy(&out).contains("}}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_prompts_are_refused_before_work_and_others_stay_fast() {
    on_each_store(
        "oversize",
        oversize_prompts_are_refused_before_work_and_others_stay_fast_on,
    )
    .await;
}

async fn oversize_prompts_are_refused_before_work_and_others_stay_fast_on(db: String) {
    let grid = EchoGrid::start(&db, &[], &["--max-batch", "8"]).await;
    let http = reqwest::Client::new();
    let base = grid.base.clone();

    // A sealed ciphertext over the cap: 413 at once.
    let res: Value = http
        .post(format!("{base}/v1/reserve"))
        .json(&json!({"model": MODEL}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let big_ct = "2".repeat(MAX_CIPHERTEXT_CHARS + 1);
    let key = res["node_x25519_pubkey"].as_str().unwrap();
    let sealed = json!({"reservation_token": res["reservation_token"], "max_tokens": 16,
                        "enc": {"ciphertext": big_ct, "client_ephemeral_pubkey": key,
                                "client_response_pubkey": key, "algorithm": ALG_V2}});
    let r = post_chat(&http, &base, &sealed).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large");

    // A plain body over 4 MiB: refused on its declared length, before a
    // byte of it is read.
    let head = raw_exchange(
        &base,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: 5242880\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/json"),
        "{head}"
    );
    assert!(head.contains("request_too_large"), "{head}");
    // A plain prompt that fits the body but not, once sealed, the node's cap.
    let r = post_chat(&http, &base, &big_plain(700_000)).await;
    assert_eq!(r.status(), 413);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "request_too_large", "{v}");

    // Three of the largest prompts allowed, at once, while a normal client
    // keeps asking.
    let heavy: Vec<_> = (0..3)
        .map(|_| {
            let http = http.clone();
            let base = base.clone();
            tokio::spawn(async move {
                let body = big_plain(370_000);
                post_chat(&http, &base, &body).await.status()
            })
        })
        .collect();
    let mut worst = Duration::ZERO;
    let mut asked = 0;
    while asked < 10 || heavy.iter().any(|h| !h.is_finished()) {
        let start = Instant::now();
        let r = post_chat(&http, &base, &plain_chat(4, false)).await;
        assert_eq!(r.status(), 200);
        worst = worst.max(start.elapsed());
        asked += 1;
        assert!(asked < 2_000, "the large prompts never finished");
    }
    for h in heavy {
        assert_eq!(h.await.unwrap(), 200);
    }
    eprintln!("normal client: {asked} requests, worst {worst:?}");
    assert!(worst < Duration::from_secs(1), "worst latency {worst:?}");
}
