//! Hostile programs are contained and reported, and the next request runs
//! normally: a fork bomb, endless memory, an endless loop, reads of host
//! secrets and of another sandbox, writes outside the work directory,
//! connections to host ports, and 100 MB on stdout.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::sandbox_support::{assert_healthy, py, sandbox_processes, test_pool, test_pool_with};

const T: Duration = Duration::from_secs(20);

/// The last stdout line of a probe program, as JSON.
fn json_line(out: &sgl::compute::exec::ExecOutcome) -> Value {
    let line = out.stdout.lines().last().unwrap_or("");
    serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{e}: stdout {:?} stderr {:?}", out.stdout, out.stderr))
}

#[tokio::test]
async fn fork_bomb_is_contained() {
    // A uid range of its own, so that the check for leftovers below sees
    // only this test's processes.
    let base = 2_000_000_000;
    let Some(p) = test_pool_with(|c| c.uid_base = base) else {
        return;
    };
    let started = Instant::now();
    let out = py(
        &p.pool,
        "import os\n\
         n = 0\n\
         while True:\n\
         \x20   try:\n\
         \x20       os.fork()\n\
         \x20       n += 1\n\
         \x20   except OSError:\n\
         \x20       pass\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(
        out.timed_out,
        "exit {} stderr {}",
        out.exit_code, out.stderr
    );
    assert_eq!(out.exit_code, 137);
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_eq!(sandbox_processes(base), Vec::<String>::new());
    // The bound is the size's process count, not the host's.
    let out = py(
        &p.pool,
        "import os, json\n\
         kids = 0\n\
         err = ''\n\
         while True:\n\
         \x20   try:\n\
         \x20       pid = os.fork()\n\
         \x20   except OSError as e:\n\
         \x20       err = type(e).__name__\n\
         \x20       break\n\
         \x20   if pid == 0:\n\
         \x20       import time\n\
         \x20       time.sleep(30)\n\
         \x20       os._exit(0)\n\
         \x20   kids += 1\n\
         print(json.dumps({'kids': kids, 'err': err}))\n",
        T,
    )
    .await;
    let v = json_line(&out);
    let limit = sgl::compute::exec::Size::Small.limits().max_processes;
    assert!(v["kids"].as_u64().unwrap() < limit, "{v}");
    assert_eq!(v["err"], "BlockingIOError", "{v}");
    // The sleeping children died with the run.
    assert_eq!(sandbox_processes(base), Vec::<String>::new());
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn endless_memory_is_contained() {
    let Some(p) = test_pool() else { return };
    let out = py(
        &p.pool,
        "a = []\nwhile True:\n    a.append(bytearray(64 * 1024 * 1024))",
        T,
    )
    .await;
    assert!(!out.timed_out);
    assert_eq!(out.exit_code, 1);
    assert!(out.stderr.contains("MemoryError"), "{}", out.stderr);
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn endless_loop_times_out() {
    let Some(p) = test_pool() else { return };
    let started = Instant::now();
    let out = py(
        &p.pool,
        "import sys, subprocess\n\
         subprocess.Popen([sys.executable, '-c', 'while True: pass'])\n\
         print('started', flush=True)\n\
         while True: pass",
        Duration::from_secs(2),
    )
    .await;
    let took = started.elapsed();
    assert!(out.timed_out);
    assert_eq!(out.exit_code, 137);
    assert_eq!(out.stdout, "started\n");
    assert!(out.execution_time_ms >= 2000, "{}", out.execution_time_ms);
    assert!(took < Duration::from_secs(6), "{took:?}");
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn host_files_are_out_of_reach() {
    let Some(p) = test_pool() else { return };
    // The coordinator's database, in a data dir outside the work root.
    let data = tempfile::tempdir().unwrap();
    let db = data.path().join("sgl.db");
    std::fs::write(&db, b"SQLite format 3\0 secret rows").unwrap();
    let code = format!(
        "import os, json\n\
         def read(p):\n\
         \x20   try:\n\
         \x20       with open(p, 'rb') as f:\n\
         \x20           return 'READ ' + repr(f.read(40))\n\
         \x20   except Exception as e:\n\
         \x20       return type(e).__name__\n\
         r = {{p: read(p) for p in ['/etc/shadow', '/etc/passwd', '/root/.bashrc', {db:?}, '/etc/ssl/private']}}\n\
         r['root'] = sorted(os.listdir('/'))\n\
         r['etc'] = sorted(os.listdir('/etc'))\n\
         r['home'] = os.path.exists('/home')\n\
         r['uid'] = os.getuid()\n\
         r['caps'] = [l for l in open('/proc/self/status') if l.startswith('CapEff')][0].split()[1]\n\
         print(json.dumps(r))\n",
        db = db.to_str().unwrap()
    );
    let out = py(&p.pool, &code, T).await;
    let v = json_line(&out);
    assert_eq!(v["/etc/shadow"], "FileNotFoundError", "{v}");
    assert_eq!(v["/etc/passwd"], "FileNotFoundError", "{v}");
    assert_eq!(v["/root/.bashrc"], "FileNotFoundError", "{v}");
    assert_eq!(v[db.to_str().unwrap()], "FileNotFoundError", "{v}");
    assert_eq!(v["/etc/ssl/private"], "FileNotFoundError", "{v}");
    assert_eq!(v["home"], false);
    assert_eq!(v["caps"], "0000000000000000");
    assert_ne!(v["uid"], 0);
    let root: Vec<&str> = v["root"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for r in &root {
        assert!(
            [
                "bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp",
                "usr", "sandbox"
            ]
            .contains(r),
            "unexpected /{r} in {root:?}"
        );
    }
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn another_sandbox_is_out_of_reach() {
    let Some(p) = test_pool() else { return };
    // A holds a secret in its work directory while B looks for it.
    let pool = p.pool.clone();
    let a = tokio::spawn(async move {
        py(
            &pool,
            "import time\nopen('secret.txt', 'w').write('A only')\ntime.sleep(4)\nprint('a done')",
            T,
        )
        .await
    });
    let mut a_dir = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let found = std::fs::read_dir(p.root.path())
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|d| d.join("secret.txt").exists());
        if found.is_some() {
            a_dir = found;
            break;
        }
    }
    let a_dir = a_dir.expect("A's work directory");
    let secret = a_dir.join("secret.txt");
    let code = format!(
        "import os, json\n\
         def read(p):\n\
         \x20   try:\n\
         \x20       return 'READ ' + open(p).read()\n\
         \x20   except Exception as e:\n\
         \x20       return type(e).__name__\n\
         def ls(p):\n\
         \x20   try:\n\
         \x20       return os.listdir(p)\n\
         \x20   except Exception as e:\n\
         \x20       return type(e).__name__\n\
         print(json.dumps({{'secret': read({secret:?}), 'root': ls({root:?}), 'pids': ls('/proc')}}))\n",
        secret = secret.to_str().unwrap(),
        root = p.root.path().to_str().unwrap(),
    );
    let out = py(&p.pool, &code, T).await;
    let v = json_line(&out);
    assert_eq!(v["secret"], "FileNotFoundError", "{v}");
    assert_eq!(v["root"], "FileNotFoundError", "{v}");
    // Only its own PID namespace: bwrap's init and the program.
    let pids: Vec<&str> = v["pids"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .filter(|s| s.chars().all(|c| c.is_ascii_digit()))
        .collect();
    assert!(pids.len() <= 2, "{pids:?}");
    let a = a.await.unwrap();
    assert_eq!(a.stdout, "a done\n");
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn writes_outside_the_work_dir_fail() {
    let Some(p) = test_pool() else { return };
    // A world-writable host directory: only the mount layout protects it.
    let outside = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        outside.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let code = format!(
        "import json\n\
         def write(p):\n\
         \x20   try:\n\
         \x20       open(p, 'w').write('x')\n\
         \x20       return 'WROTE'\n\
         \x20   except Exception as e:\n\
         \x20       return type(e).__name__\n\
         ps = [{o:?}, '/usr/x', '/etc/x', '/x', '/dev/x', '/proc/x', '/sandbox/../x', '/tmp/ok', '/sandbox/ok']\n\
         print(json.dumps({{p: write(p) for p in ps}}))\n",
        o = outside.path().join("x").to_str().unwrap()
    );
    let out = py(&p.pool, &code, T).await;
    let v = json_line(&out);
    for (k, w) in v.as_object().unwrap() {
        let allowed = k == "/tmp/ok" || k == "/sandbox/ok";
        assert_eq!(w == "WROTE", allowed, "{k}: {w}");
    }
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(out.files, vec![("ok".into(), b"x".to_vec())]);
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn host_ports_are_refused() {
    let Some(p) = test_pool() else { return };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let code = format!(
        "import socket, json\n\
         def connect(h, p):\n\
         \x20   try:\n\
         \x20       socket.create_connection((h, p), timeout=3).close()\n\
         \x20       return 'CONNECTED'\n\
         \x20   except Exception as e:\n\
         \x20       return type(e).__name__\n\
         print(json.dumps({{'pg': connect('127.0.0.1', 5432), 'own': connect('127.0.0.1', {port}), 'v6': connect('::1', {port}), 'out': connect('1.1.1.1', 443)}}))\n"
    );
    let out = py(&p.pool, &code, T).await;
    let v = json_line(&out);
    for k in ["pg", "own", "v6", "out"] {
        assert_ne!(v[k], "CONNECTED", "{k}: {v}");
    }
    // Nothing reached the host's listener.
    let accepted = tokio::time::timeout(Duration::from_millis(200), listener.accept()).await;
    assert!(accepted.is_err(), "the sandbox reached the host's loopback");
    assert_healthy(&p.pool).await;
}

#[tokio::test]
async fn huge_stdout_is_truncated() {
    let Some(p) = test_pool() else { return };
    let cap = sgl::compute::exec::Size::Small.limits().max_output_bytes;
    let started = Instant::now();
    let out = py(
        &p.pool,
        "import sys\nchunk = b'x' * (1 << 20)\nfor _ in range(100):\n    sys.stdout.buffer.write(chunk)\nprint('done', file=sys.stderr)",
        T,
    )
    .await;
    assert_eq!(out.exit_code, 0, "{}", out.stderr);
    assert!(out.stdout_truncated && !out.stderr_truncated);
    assert_eq!(out.stderr, "done\n");
    let marker = format!("\n[sgl: stdout truncated at {cap} bytes]\n");
    assert!(out.stdout.ends_with(&marker));
    assert_eq!(out.stdout.len(), cap + marker.len());
    assert!(started.elapsed() < Duration::from_secs(15));
    assert_healthy(&p.pool).await;
}
