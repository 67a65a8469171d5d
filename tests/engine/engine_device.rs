//! Device selection: asking for a device this build or this machine cannot
//! give fails at once with the reason, from the library and from every
//! command that loads the engine (`sgl node serve`, `sgl node start`,
//! `sgl bench`), whether the device comes from `--device` or from the
//! `SGL_DEVICE` setting a service unit carries.
#![cfg(feature = "node")]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sgl::engine::{DeviceChoice, Engine, EngineConfig};

/// Whether this machine shows an NVIDIA GPU to the process.
fn gpu_present() -> bool {
    std::path::Path::new("/dev/nvidia0").exists()
}

/// What a CUDA request that parses but cannot be served says.
fn unavailable_reason() -> &'static str {
    if cfg!(feature = "cuda") {
        "no usable cuda device"
    } else {
        "built without cuda support"
    }
}

#[test]
fn cuda_without_the_feature_or_a_device_is_a_clear_error() {
    // cuda:7 is absent on any machine this runs on; cuda:0 only without a GPU.
    let mut ordinals = vec![7];
    if !gpu_present() || !cfg!(feature = "cuda") {
        ordinals.push(0);
    }
    for i in ordinals {
        // The device is checked before the file is opened.
        let mut cfg = EngineConfig::new("smollm2-135m.gguf", "smollm2-135m");
        cfg.device = DeviceChoice::Cuda(i);
        let err = Engine::load(cfg).expect_err("no CUDA here").to_string();
        assert!(err.contains(&format!("--device cuda:{i}")), "{err}");
        assert!(err.to_lowercase().contains(unavailable_reason()), "{err}");
    }
}

/// The commands that load an engine, each with the arguments it needs
/// besides the device. None gets far enough to use the network.
fn commands(dir: &std::path::Path) -> Vec<(&'static str, Vec<String>)> {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        (
            "bench",
            s(&["bench", "--concurrency", "1", "--bandwidth-mib", "1"]),
        ),
        (
            "node serve",
            s(&["node", "serve", "--host", "127.0.0.1", "--port", "0"]),
        ),
        (
            "node start",
            vec![
                "node".into(),
                "start".into(),
                "--config-dir".into(),
                dir.display().to_string(),
                "--coordinator".into(),
                "http://127.0.0.1:9".into(),
                "--evidence".into(),
                "none".into(),
            ],
        ),
    ]
}

/// Runs `sgl` and returns (success, stderr in lower case); a run that does
/// not end within a minute has got past device selection and is a failure.
fn run_sgl(args: &[String], device_env: Option<&str>) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sgl"));
    cmd.args(args)
        .env_remove("SGL_DEVICE")
        .env_remove("SGL_COORDINATOR_URL")
        .env_remove("SGL_REGISTRATION_CODE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(d) = device_env {
        cmd.env("SGL_DEVICE", d);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).to_lowercase(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "sgl {} did not fail at device selection: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Device strings and what the error must name.
fn cases() -> Vec<(&'static str, &'static str)> {
    let mut cases = vec![
        ("tpu", "cpu, cuda or cuda:n"),
        ("cuda:x", "bad --device cuda:x"),
        ("cuda:", "bad --device cuda:"),
        ("cuda:7", unavailable_reason()),
    ];
    // Plain `cuda` is the first GPU: refused unless this build has the
    // feature and this machine has a GPU.
    if !(cfg!(feature = "cuda") && gpu_present()) {
        cases.push(("cuda", unavailable_reason()));
    }
    cases
}

#[test]
fn every_engine_command_refuses_unknown_and_unavailable_devices() {
    let dir = tempfile::tempdir().unwrap();
    for (name, base) in commands(dir.path()) {
        for (device, expected) in cases() {
            let mut args = base.clone();
            args.extend(["--device".to_string(), device.to_string()]);
            let (ok, err) = run_sgl(&args, None);
            assert!(!ok, "sgl {name} --device {device} must fail");
            assert!(
                err.contains(expected),
                "sgl {name} --device {device}: {err}"
            );
        }
    }
}

#[test]
fn the_sgl_device_setting_is_checked_like_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    for (name, args) in commands(dir.path()) {
        for (device, expected) in cases() {
            let (ok, err) = run_sgl(&args, Some(device));
            assert!(!ok, "SGL_DEVICE={device} sgl {name} must fail");
            assert!(
                err.contains(expected),
                "SGL_DEVICE={device} sgl {name}: {err}"
            );
        }
    }
    // The flag wins over the setting.
    let (name, mut args) = commands(dir.path()).remove(0);
    args.extend(["--device".to_string(), "tpu".to_string()]);
    let (ok, err) = run_sgl(&args, Some("cuda:7"));
    assert!(!ok, "sgl {name}");
    assert!(err.contains("cpu, cuda or cuda:n"), "sgl {name}: {err}");
}

#[test]
fn the_node_unit_lets_the_service_reach_the_gpu() {
    let unit = include_str!("../../systemd/sgl-node.service");
    // Current drivers name the per-GPU major `nvidia` in /proc/devices,
    // older ones `nvidia-frontend`; /dev/nvidia-uvm is what CUDA needs.
    for line in [
        "DevicePolicy=closed",
        "DeviceAllow=char-nvidia rw",
        "DeviceAllow=char-nvidia-frontend rw",
        "DeviceAllow=char-nvidia-uvm rw",
        "DeviceAllow=/dev/nvidiactl rw",
        "DeviceAllow=/dev/nvidia-uvm rw",
    ] {
        assert!(unit.lines().any(|l| l == line), "{line}");
    }
}
