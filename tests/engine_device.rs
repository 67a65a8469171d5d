//! Device selection on a machine without a GPU: asking for CUDA fails at once
//! with a reason, from the library and from the command line.
#![cfg(feature = "node")]

use std::process::Command;

use sgl::engine::{DeviceChoice, Engine, EngineConfig};

#[test]
fn cuda_without_the_feature_or_a_device_is_a_clear_error() {
    let mut cfg = EngineConfig::new("smollm2-135m");
    cfg.device = DeviceChoice::Cuda(0);
    let err = Engine::load(cfg).expect_err("no CUDA here").to_string();
    assert!(err.contains("--device cuda:0"), "{err}");
    if cfg!(feature = "cuda") {
        assert!(err.contains("no usable CUDA device"), "{err}");
    } else {
        assert!(err.contains("built without CUDA support"), "{err}");
    }
}

#[test]
fn the_cli_refuses_unknown_and_unavailable_devices() {
    for (device, expected) in [("tpu", "device"), ("cuda:x", "cuda"), ("cuda:1", "cuda:1")] {
        let out = Command::new(env!("CARGO_BIN_EXE_sgl"))
            .args([
                "bench",
                "--device",
                device,
                "--concurrency",
                "1",
                "--bandwidth-mib",
                "1",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "--device {device} must fail");
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(err.contains(expected), "--device {device}: {err}");
    }
}
