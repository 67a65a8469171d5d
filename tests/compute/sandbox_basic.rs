//! The sandbox runner's ordinary behaviour: Python and Node.js programs,
//! exit codes, input and output files, nothing shared between runs, the
//! bounded pool, and configurations refused at start.

use std::time::Duration;

use sgl::compute::exec::{valid_file_name, NetworkPolicy, SandboxError, SandboxPool, Stack};

use crate::sandbox_support::{py, request, run, test_pool, test_pool_with};

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn python_prints_and_exits() {
    let Some(p) = test_pool() else { return };
    let out = py(&p.pool, "print(1 + 1)", T).await;
    assert_eq!(out.stdout, "2\n");
    assert_eq!(out.stderr, "");
    assert_eq!(out.exit_code, 0);
    assert!(!out.timed_out && !out.stdout_truncated && !out.stderr_truncated);
    assert!(out.sandbox_id.starts_with("sbx_") && out.sandbox_id.len() == 20);
    assert!(out.files.is_empty() && !out.files_truncated);

    let out = py(
        &p.pool,
        "import sys\nprint('bad', file=sys.stderr)\nsys.exit(3)",
        T,
    )
    .await;
    assert_eq!((out.exit_code, out.stderr.as_str()), (3, "bad\n"));

    let out = py(&p.pool, "raise ValueError('boom')", T).await;
    assert_eq!(out.exit_code, 1);
    assert!(out.stderr.contains("ValueError: boom"), "{}", out.stderr);

    // A signal is 128 + its number.
    let out = py(
        &p.pool,
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
        T,
    )
    .await;
    assert_eq!(out.exit_code, 128 + 15, "{}", out.stderr);
    // The work directory is gone after the run.
    assert_eq!(std::fs::read_dir(p.root.path()).unwrap().count(), 0);
}

#[tokio::test]
async fn node_runs() {
    let Some(p) = test_pool() else { return };
    let mut req = request(
        Stack::Node,
        "const fs = require('fs');\n\
         console.log(1 + 1);\n\
         console.error(fs.readFileSync('in.txt', 'utf8').trim());\n\
         fs.writeFileSync('out.json', JSON.stringify({ok: true}));",
        T,
    );
    req.files
        .push(("in.txt".into(), b"from the request\n".to_vec()));
    let out = run(&p.pool, req).await;
    assert_eq!(out.exit_code, 0, "stderr: {}", out.stderr);
    assert_eq!(out.stdout, "2\n");
    assert_eq!(out.stderr, "from the request\n");
    assert_eq!(
        out.files,
        vec![("out.json".into(), br#"{"ok":true}"#.to_vec())]
    );

    let out = run(&p.pool, request(Stack::Node, "process.exit(7)", T)).await;
    assert_eq!(out.exit_code, 7);
}

#[tokio::test]
async fn input_files_visible_output_files_returned() {
    let Some(p) = test_pool() else { return };
    let mut req = request(
        Stack::Python,
        "import os, helper\n\
         print(open('data.csv').read(), end='')\n\
         print(helper.VALUE)\n\
         print(sorted(os.listdir('.')))\n\
         open('changed.txt', 'w').write('new')\n\
         os.makedirs('out/deep', exist_ok=True)\n\
         open('out/deep/r.bin', 'wb').write(bytes(range(256)))\n\
         os.symlink('/etc/ld.so.cache', 'link')\n\
         os.mkfifo('fifo')\n",
        T,
    );
    req.files = vec![
        ("data.csv".into(), b"a,b\n1,2\n".to_vec()),
        ("helper.py".into(), b"VALUE = 'imported'\n".to_vec()),
        ("changed.txt".into(), b"old".to_vec()),
        ("sub/same.txt".into(), b"unchanged".to_vec()),
    ];
    let out = run(&p.pool, req).await;
    assert_eq!(out.exit_code, 0, "stderr: {}", out.stderr);
    assert_eq!(
        out.stdout,
        "a,b\n1,2\nimported\n['changed.txt', 'data.csv', 'helper.py', 'main.py', 'sub']\n"
    );
    // New and changed files only; not the unchanged inputs, the program,
    // the symlink or the fifo.
    assert_eq!(
        out.files,
        vec![
            ("changed.txt".into(), b"new".to_vec()),
            ("out/deep/r.bin".into(), (0..=255).collect::<Vec<u8>>()),
        ]
    );
    assert!(!out.files_truncated);
}

#[tokio::test]
async fn output_files_are_capped() {
    let Some(p) = test_pool_with(|c| c.limits[0].max_result_files_bytes = 1000) else {
        return;
    };
    let out = py(
        &p.pool,
        "open('a.txt','w').write('a' * 600)\nopen('b.txt','w').write('b' * 600)\nopen('c.txt','w').write('c' * 300)",
        T,
    )
    .await;
    assert_eq!(out.exit_code, 0, "{}", out.stderr);
    let names: Vec<&str> = out.files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["a.txt", "c.txt"]);
    assert!(out.files_truncated);
}

#[tokio::test]
async fn two_requests_share_nothing() {
    let Some(p) = test_pool() else { return };
    let first = py(
        &p.pool,
        "import os\n\
         print(os.getcwd(), os.listdir('/tmp'))\n\
         open('/sandbox/left.txt', 'w').write('x')\n\
         open('/tmp/left.txt', 'w').write('x')",
        T,
    )
    .await;
    assert_eq!(first.stdout, "/sandbox []\n", "{}", first.stderr);
    let second = py(
        &p.pool,
        "import os\nprint(os.path.exists('/sandbox/left.txt'), os.path.exists('left.txt'), os.listdir('/tmp'), os.listdir('.'))",
        T,
    )
    .await;
    assert_eq!(
        second.stdout, "False False [] ['main.py']\n",
        "{}",
        second.stderr
    );
    assert_ne!(first.sandbox_id, second.sandbox_id);
}

#[tokio::test]
async fn pool_is_bounded() {
    let Some(p) = test_pool_with(|c| {
        c.slots = 1;
        c.queue_wait = Duration::from_millis(200);
    }) else {
        return;
    };
    assert_eq!((p.pool.slots(), p.pool.busy()), (1, 0));
    let held = p.pool.acquire().await.unwrap();
    assert_eq!(p.pool.busy(), 1);
    let t0 = std::time::Instant::now();
    assert!(matches!(p.pool.acquire().await, Err(SandboxError::Busy)));
    assert!(t0.elapsed() >= Duration::from_millis(200));
    // A waiter gets the slot when it frees within queue_wait.
    let pool = p.pool.clone();
    let waiter = tokio::spawn(async move { pool.acquire().await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
    assert_eq!(p.pool.busy(), 0);
    // A permit runs once and frees its slot.
    let permit = p.pool.acquire().await.unwrap();
    let out = permit
        .run(request(Stack::Python, "print('held')", T))
        .await
        .unwrap();
    assert_eq!(out.stdout, "held\n");
    assert_eq!(p.pool.busy(), 0);
}

#[tokio::test]
async fn bad_requests_are_refused() {
    let Some(p) = test_pool() else { return };
    let mut req = request(Stack::Python, "print(1)", T);
    req.files.push(("main.py".into(), b"x".to_vec()));
    let permit = p.pool.acquire().await.unwrap();
    assert!(matches!(
        permit.run(req).await,
        Err(SandboxError::Invalid(_))
    ));
    let mut req = request(Stack::Python, "print(1)", T);
    req.files.push(("../escape".into(), b"x".to_vec()));
    let permit = p.pool.acquire().await.unwrap();
    assert!(matches!(
        permit.run(req).await,
        Err(SandboxError::Invalid(_))
    ));
    assert!(valid_file_name("data/in.csv") && !valid_file_name("/etc/passwd"));
    assert_eq!(std::fs::read_dir(p.root.path()).unwrap().count(), 0);
}

#[test]
fn unsafe_configurations_fail_closed() {
    let root = tempfile::tempdir().unwrap();
    let base = sgl::compute::exec::SandboxConfig::new(root.path());

    let mut cfg = base.clone();
    cfg.bwrap = "/nonexistent/bwrap".into();
    let e = SandboxPool::new(cfg).err().expect("missing bwrap refused");
    assert!(e.to_string().contains("bwrap"), "{e}");

    let mut cfg = base.clone();
    cfg.node = "/nonexistent/node".into();
    assert!(SandboxPool::new(cfg).is_err());

    // Egress without pasta or ip is refused, not run with less isolation.
    for tool in ["pasta", "ip"] {
        let mut cfg = base.clone();
        cfg.network = NetworkPolicy::Egress;
        match tool {
            "pasta" => cfg.pasta = "/nonexistent/pasta".into(),
            _ => cfg.ip = "/nonexistent/ip".into(),
        }
        let e = SandboxPool::new(cfg)
            .err()
            .expect("egress without its tools refused");
        assert!(e.to_string().contains(tool), "{e}");
    }

    let mut cfg = base;
    cfg.slots = 0;
    assert!(SandboxPool::new(cfg).is_err());
}
