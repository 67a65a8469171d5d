//! The official OpenAI Python SDK against `sgl node serve`, streaming and not.
//! Skipped unless `openai` is importable (SGL_REQUIRE_OPENAI=1 makes that a
//! failure) or the model is not cached (SGL_REQUIRE_MODEL=1 likewise).
#![cfg(feature = "node")]

use crate::engine_support;

use std::process::Command;

fn openai_importable() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import openai"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("SGL_REQUIRE_OPENAI").as_deref() == Ok("1") {
            panic!("SGL_REQUIRE_OPENAI=1 but `import openai` fails (pip install openai)");
        }
        eprintln!("skipping: the openai Python package is not installed");
    }
    ok
}

#[tokio::test]
async fn openai_python_sdk_streams_and_non_streams() {
    if !openai_importable() || engine_support::model_path().is_none() {
        return;
    }
    let server = engine_support::Server::start(&[]).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/openai_sdk_check.py");
    let out = tokio::task::spawn_blocking({
        let base = server.base.clone();
        move || {
            Command::new("python3")
                .args([script, &base, engine_support::MODEL_ID])
                .output()
                .expect("run python3")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "SDK check failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `response_format` (`json_object`, `json_schema`) through the SDK, JSON and
/// SSE: the output parses and validates with the `jsonschema` package.
#[tokio::test]
async fn openai_python_sdk_json_mode() {
    run_check("openai_json_mode_check.py", "JSON mode check").await;
}

/// `n`, `logprobs` and `top_logprobs` through the SDK, JSON and streamed.
#[tokio::test]
async fn openai_python_sdk_n_and_logprobs() {
    run_check("openai_choices_check.py", "n and logprobs check").await;
}

/// `tools` and `tool_choice` through the SDK: forced calls (required and
/// named), JSON and streamed, validate with `jsonschema`; a follow-up turn
/// with the tool's result is accepted.
#[tokio::test]
async fn openai_python_sdk_tools() {
    run_check("openai_tools_check.py", "tools check").await;
}

/// Run `tests/py/<script>` against `sgl node serve` on the test model.
async fn run_check(script: &str, what: &str) {
    if !openai_importable() || engine_support::model_path().is_none() {
        return;
    }
    let server = engine_support::Server::start(&[]).await;
    let script = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = tokio::task::spawn_blocking({
        let base = server.base.clone();
        move || {
            Command::new("python3")
                .args([script.as_str(), &base, engine_support::MODEL_ID])
                .output()
                .expect("run python3")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{what} failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
