//! The grid explorer in a real browser: a development coordinator with two
//! echo nodes (one attested with simulated evidence, one self-reported, one
//! of them at a custom price), some plain chat traffic, then Debian's
//! `chromium` headless loads `/`, runs the page's script and dumps the DOM.
//! Every number the page shows must equal what the JSON APIs answer
//! (`/grid/capacity`, `/v1/models`, `/grid/models`, `/v1/providers`,
//! `/grid/explorer.json`, `/metrics`), and the simulated node's verdict is
//! listed step by step. A screenshot is saved under the build directory's
//! `test-output/` and its path printed.
//!
//! Skipped without chromium (or the binary SGL_CHROMIUM names) unless
//! SGL_REQUIRE_CHROMIUM=1.
#![cfg(all(feature = "coordinator", unix))]

use crate::grid_support;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grid_support::{
    free_port, node_init, node_start, providers, sgl_ok, CoordinatorProc, MODEL, OPERATOR,
};
use serde_json::{json, Value};

/// The browser: SGL_CHROMIUM, else `chromium` or `chromium-browser` on the
/// PATH.
fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SGL_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    let found = std::env::split_paths(&path)
        .flat_map(|d| [d.join("chromium"), d.join("chromium-browser")])
        .find(|p| p.is_file());
    if found.is_none() {
        if std::env::var("SGL_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!(
                "SGL_REQUIRE_CHROMIUM=1 but chromium is not installed (apt-get install chromium)"
            );
        }
        eprintln!("skipping: chromium is not installed (apt-get install chromium)");
    }
    found
}

/// Run the browser headless on `url` with `args`, killed after a minute;
/// its stdout. A fresh profile each time, so runs never share state.
fn browse(browser: &Path, url: &str, args: &[&str]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(browser)
        .args([
            "--headless",
            // Root in a container has no user namespace for the sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-extensions",
            "--disable-background-networking",
            "--hide-scrollbars",
            // Enough for the first refresh (its fetches pause the virtual
            // clock) and not much more.
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium starts");
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "chromium failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The start tags that carry `name="value"`, each up to its `>`.
fn tags<'a>(dom: &'a str, name: &str, value: &str) -> Vec<&'a str> {
    let needle = format!(" {name}=\"{}\"", escape(value));
    dom.match_indices(&needle)
        .filter_map(|(i, _)| {
            let open = dom[..i].rfind('<')?;
            let close = i + dom[i..].find('>')?;
            Some(&dom[open..=close])
        })
        .collect()
}

/// The one start tag with `name="value"`.
fn tag<'a>(dom: &'a str, name: &str, value: &str) -> &'a str {
    let found = tags(dom, name, value);
    assert_eq!(found.len(), 1, "{name}={value:?} in:\n{dom}");
    found[0]
}

/// An attribute of a start tag, unescaped.
fn attr(tag: &str, name: &str) -> Option<String> {
    let needle = format!(" {name}=\"");
    let start = tag.find(&needle)? + needle.len();
    let len = tag[start..].find('"')?;
    Some(unescape(&tag[start..start + len]))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('"', "&quot;")
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The element that starts with `tag` up to its closing `</name>` (no
/// nesting of the same element inside, as the page draws it).
fn element<'a>(dom: &'a str, tag: &str, name: &str) -> &'a str {
    let start = dom.find(tag).unwrap();
    let end = dom[start..].find(&format!("</{name}>")).unwrap();
    &dom[start..start + end]
}

/// A `data-stat` as the page holds it (the raw number) and as it shows it
/// (the text).
fn stat_shown(dom: &str, name: &str) -> (String, String) {
    let t = tag(dom, "data-stat", name);
    let value = attr(t, "data-value").unwrap_or_else(|| panic!("{name}: no value in {t}"));
    let after = &dom[dom.find(t).unwrap() + t.len()..];
    let shown = unescape(&after[..after.find('<').unwrap()]);
    (value, shown)
}

/// A `data-stat` shown as it is held: both must agree, and the value is
/// returned.
fn stat(dom: &str, name: &str) -> String {
    let (value, shown) = stat_shown(dom, name);
    assert_eq!(shown, value, "{name}: shown {shown:?}, held {value:?}");
    value
}

fn stat_u64(dom: &str, name: &str) -> u64 {
    let v = stat(dom, name);
    v.parse()
        .unwrap_or_else(|_| panic!("{name}: {v:?} is not a count"))
}

async fn get_json(url: String) -> Value {
    let resp = reqwest::get(&url).await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    resp.json().await.unwrap()
}

/// USD as `sgl price set` reads it, from micro-USD.
fn usd(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_explorer_page_shows_what_the_apis_say() {
    let Some(browser) = chromium() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    // Node "sim" attests with simulated evidence the coordinator is told
    // to trust; node "plain" sends none.
    let sim_dir = dir.path().join("sim");
    let plain_dir = dir.path().join("plain");
    let (sim_d, plain_d) = (sim_dir.to_str().unwrap(), plain_dir.to_str().unwrap());
    node_init(sim_d, &base, OPERATOR);
    node_init(plain_d, &base, OPERATOR);
    let sim_key =
        sgl::attest::sim::SimKey::load_or_create(&sim_dir.join(sgl::attest::sim::KEY_FILE))
            .unwrap()
            .public()
            .to_b58();
    let _coordinator =
        CoordinatorProc::on_port(port, &["--in-memory", "--simulated-tee-key", &sim_key]);
    let echo = ["--engine", "echo", "--model", MODEL, "--evidence"];
    let log = |name: &str| Stdio::from(File::create(dir.path().join(name)).unwrap());
    let _sim = node_start(sim_d, &[&echo[..], &["simulated"]].concat(), log("sim.log"));
    let _plain = node_start(plain_d, &[&echo[..], &["none"]].concat(), log("plain.log"));
    let node_id = |d: &Path| {
        sgl::node::identity_files::load_node_file(d)
            .unwrap()
            .node_id
            .unwrap()
    };
    let start = Instant::now();
    let listing = loop {
        let v = providers(&base).await;
        let online = v["providers"]
            .as_array()
            .map_or(0, |p| p.iter().filter(|p| p["online"] == true).count());
        if online == 2 {
            break v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "both nodes online: {v}\nsim: {}\nplain: {}",
            std::fs::read_to_string(dir.path().join("sim.log")).unwrap_or_default(),
            std::fs::read_to_string(dir.path().join("plain.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (sim_id, plain_id) = (node_id(&sim_dir), node_id(&plain_dir));

    // The plain node asks twice the reference price.
    let reference = (listing["providers"][0]["input_per_m"].as_f64().unwrap() * 1e6).round() as u64;
    let (input, output) = (usd(reference * 2), usd(reference * 3));
    sgl_ok(&[
        "price",
        "set",
        "--config-dir",
        plain_d,
        "--model",
        MODEL,
        "--input-per-m",
        &input,
        "--output-per-m",
        &output,
    ]);

    // Traffic the page must count.
    const CHATS: u64 = 3;
    let client = reqwest::Client::new();
    for i in 0..CHATS {
        let body = json!({"model": MODEL, "max_tokens": 4,
            "messages": [{"role": "user", "content": format!("one two three four {i}")}]});
        let resp = client
            .post(format!("{base}/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
    }
    // Metrics count a job once its bill closes, just after the answer.
    let billed = format!("sgl_coordinator_jobs_total{{outcome=\"completed\"}} {CHATS}\n");
    let start = Instant::now();
    while !reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .contains(&billed)
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "jobs never billed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The page, after its script ran.
    let page = format!("{base}/");
    let dom = {
        let b = browser.clone();
        let p = page.clone();
        tokio::task::spawn_blocking(move || browse(&b, &p, &["--dump-dom"]))
            .await
            .unwrap()
    };
    let body = tags(&dom, "data-state", "ready");
    assert!(
        body.iter().any(|t| t.starts_with("<body")),
        "the page never drew the grid:\n{dom}"
    );

    // What the APIs say now (nothing changes between: no traffic, both
    // nodes stay online).
    let capacity = get_json(format!("{base}/grid/capacity")).await;
    let models = get_json(format!("{base}/v1/models")).await;
    let grid_models = get_json(format!("{base}/grid/models")).await;
    let listing = providers(&base).await;
    let explorer = get_json(format!("{base}/grid/explorer.json")).await;

    // Capacity.
    assert_eq!(stat_u64(&dom, "nodes-online"), 2);
    assert_eq!(capacity["active_nodes"], 2);
    assert_eq!(stat_u64(&dom, "nodes-total"), capacity["total_nodes"]);
    assert_eq!(
        stat_u64(&dom, "nodes-available"),
        capacity["available_nodes"]
    );
    let slots: u64 = listing["providers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["max_concurrent_jobs"].as_u64().unwrap())
        .sum();
    assert!(slots >= 2);
    assert_eq!(stat_u64(&dom, "slots-total"), slots);
    assert_eq!(explorer["capacity"]["slots_total"], slots);
    assert_eq!(stat_u64(&dom, "slots-busy"), 0);
    assert_eq!(stat_shown(&dom, "load"), ("0".into(), "0 %".into()));

    // Models.
    let data = models["data"].as_array().unwrap();
    assert_eq!(stat_u64(&dom, "models-count"), data.len() as u64);
    assert_eq!(data.len(), 1);
    let table = element(&dom, "<tbody id=\"models\">", "tbody");
    let row = tag(table, "data-model", MODEL);
    assert!(row.starts_with("<tr"), "{row}");
    assert_eq!(
        attr(row, "data-node-count").unwrap(),
        grid_models["models"][0]["sgl_node_count"].to_string()
    );
    assert_eq!(grid_models["models"][0]["sgl_node_count"], 2);
    assert_eq!(
        attr(row, "data-context-window").unwrap(),
        data[0]["context_window"].to_string()
    );

    // Providers, at their effective prices.
    let rows = listing["providers"].as_array().unwrap();
    assert_eq!(stat_u64(&dom, "providers-count"), rows.len() as u64);
    for p in rows {
        let id = p["node_id"].as_str().unwrap();
        let row = tag(&dom, "data-provider", id);
        for (a, k) in [
            ("data-input-per-m", "input_per_m"),
            ("data-output-per-m", "output_per_m"),
            ("data-blended-per-1k", "blended_per_1k"),
        ] {
            let shown: f64 = attr(row, a).unwrap().parse().unwrap();
            // serde_json's default float parsing may land one unit in the
            // last place away from the browser's exact one.
            let api = p[k].as_f64().unwrap();
            assert!(
                (shown - api).abs() <= api.abs() * 1e-12,
                "{id} {k}: {shown} {api}"
            );
        }
        assert_eq!(
            attr(row, "data-custom").unwrap(),
            p["is_custom"].to_string()
        );
        assert_eq!(attr(row, "data-online").unwrap(), "true");
    }
    let custom = tag(&dom, "data-provider", &plain_id);
    assert_eq!(attr(custom, "data-custom").as_deref(), Some("true"));
    let shown: f64 = attr(custom, "data-input-per-m").unwrap().parse().unwrap();
    assert_eq!((shown * 1e6).round() as u64, reference * 2);

    // Each node's attestation: the simulated one verified step by step, the
    // other self-reported with no verdict.
    let card = tag(&dom, "data-node", &sim_id);
    assert_eq!(attr(card, "data-level").as_deref(), Some("simulated"));
    assert_eq!(attr(card, "data-verdict").as_deref(), Some("verified"));
    assert_eq!(attr(card, "data-state").as_deref(), Some("active"));
    let listed = explorer["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node_id"] == sim_id.as_str())
        .unwrap()
        .clone();
    let checks = listed["attestation"]["checks"].as_array().unwrap();
    assert!(!checks.is_empty());
    let article = element(&dom, card, "article");
    let steps =
        tags(article, "data-status", "pass").len() + tags(article, "data-status", "skipped").len();
    assert_eq!(steps, checks.len(), "{article}");
    assert!(tags(article, "data-status", "fail").is_empty(), "{article}");
    for c in checks {
        let step = c["step"].as_str().unwrap();
        let li = tag(article, "data-step", step);
        assert_eq!(
            attr(li, "data-status").unwrap(),
            c["status"].as_str().unwrap()
        );
    }
    for step in ["signature", "report_data"] {
        assert_eq!(
            attr(tag(article, "data-step", step), "data-status").as_deref(),
            Some("pass"),
            "{step}"
        );
    }
    let card = tag(&dom, "data-node", &plain_id);
    assert_eq!(attr(card, "data-level").as_deref(), Some("self_reported"));
    assert_eq!(attr(card, "data-verdict").as_deref(), Some("self_reported"));
    assert_eq!(attr(card, "data-checks").as_deref(), Some("0"));

    // Traffic: the page's window starts when the coordinator did (no
    // explorer answer came before it), so it holds every chat.
    assert_eq!(stat_u64(&dom, "jobs-completed"), CHATS);
    assert_eq!(stat_u64(&dom, "latency-requests"), CHATS);
    assert_eq!(stat_u64(&dom, "jobs-failed"), 0);
    let tokens = stat_u64(&dom, "completion-tokens");
    assert!(tokens > 0 && tokens <= 4 * CHATS, "{tokens}");
    let (p50, shown) = stat_shown(&dom, "latency-p50");
    let p50: f64 = p50.parse().unwrap();
    assert!(p50 > 0.0 && p50 <= 60.0, "{p50}");
    assert!(shown.starts_with("≤ "), "{shown}");

    // A picture of it, for people.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-output");
    std::fs::create_dir_all(&out).unwrap();
    let png = out.join("explorer.png");
    let _ = std::fs::remove_file(&png);
    let shot = format!("--screenshot={}", png.display());
    tokio::task::spawn_blocking(move || {
        browse(&browser, &page, &[&shot, "--window-size=1280,1320"])
    })
    .await
    .unwrap();
    let bytes = std::fs::read(&png).expect("a screenshot");
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert!(
        bytes.len() > 10_000,
        "a blank screenshot? {} bytes",
        bytes.len()
    );
    println!("explorer screenshot: {}", png.display());
}
