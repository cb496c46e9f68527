//! Each containment test runs under every mechanism this machine offers and asserts what that
//! mechanism's [`IsolationReport`] claims; a broken containment makes the program succeed at what
//! it tries, which fails the test.

use super::*;
use std::time::{Duration, Instant};

/// The tests run one at a time: their time limits are checked on a shared 2-core machine, and
/// a fork bomb next to a CPU-time test would starve it.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn mechanisms() -> Vec<Isolation> {
    let caps = capabilities();
    let mut v = Vec::new();
    match &caps.namespaces {
        Ok(()) => v.push(Isolation::Namespaces),
        Err(why) => eprintln!("skipping the namespace mechanism: {why}"),
    }
    match caps.landlock_abi {
        Some(_) => v.push(Isolation::Landlock),
        None => eprintln!("skipping the Landlock mechanism: not enabled"),
    }
    v.push(Isolation::RlimitsOnly);
    v
}

fn limits(isolation: Isolation) -> SandboxLimits {
    SandboxLimits {
        isolation,
        cpu_secs: 5,
        wall_secs: 10.0,
        ..Default::default()
    }
}

fn py(code: &str, limits: &SandboxLimits) -> SandboxOutcome {
    run_sandboxed("python3", &["-c", code], &[], limits).expect("sandbox runs")
}

/// A string no other process on the machine has in its command line.
fn marker(name: &str) -> String {
    format!(
        "finetune-sandbox-test-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Live processes (not zombies) whose command line contains `marker`.
fn processes_with(marker: &str) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let zombie = std::fs::read_to_string(e.path().join("stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true);
        if !zombie && String::from_utf8_lossy(&cmdline).contains(marker) {
            n += 1;
        }
    }
    n
}

/// Waits up to a second for processes with `marker` to be gone (their reaping by init can lag
/// their death by a moment).
fn gone(marker: &str) -> bool {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        if processes_with(marker) == 0 {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    processes_with(marker) == 0
}

#[test]
fn a_normal_program_runs_in_its_own_directory_with_its_files() {
    let _serial = serial();
    for iso in mechanisms() {
        let code = "import os, sys\n\
                    sys.path.insert(0, '.')\n\
                    from pkg.m import VALUE\n\
                    open('out.txt', 'w').write(VALUE * 2)\n\
                    assert open('out.txt').read() == 'abab'\n\
                    assert os.environ['HOME'] == os.getcwd() == os.environ['TMPDIR']\n\
                    assert sorted(os.environ) == ['HOME', 'LANG', 'PATH', 'TMPDIR'] or \
                           sorted(os.environ) == ['HOME', 'PATH', 'TMPDIR'], os.environ\n\
                    print('ok', VALUE)\n\
                    print('to stderr', file=sys.stderr)\n";
        let o = run_sandboxed(
            "python3",
            &["main.py"],
            &[
                ("main.py", code.as_bytes()),
                ("pkg/m.py", b"VALUE = 'ab'\n"),
            ],
            &limits(iso),
        )
        .unwrap();
        assert_eq!(o.status, SandboxStatus::Passed, "{iso:?}: {o:#?}");
        assert_eq!(o.stdout, "ok ab\n");
        assert_eq!(o.stderr, "to stderr\n");
        let failed = py("import sys; sys.exit(3)", &limits(iso));
        assert_eq!(failed.status, SandboxStatus::Failed { code: 3 });
    }
}

#[test]
fn bad_file_names_and_missing_programs_are_errors() {
    let _serial = serial();
    let l = SandboxLimits::default();
    for name in ["", "/etc/x", "../x", "a/../../x", "./x"] {
        let err = run_sandboxed("python3", &[], &[(name, b"")], &l).unwrap_err();
        assert!(err.to_string().contains("relative path"), "{name}: {err}");
    }
    let err = run_sandboxed("no-such-program-finetune", &[], &[], &l).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot start no-such-program-finetune"),
        "{err}"
    );
}

#[test]
fn an_infinite_loop_is_stopped_by_the_cpu_limit_and_a_sleeper_by_the_wall_clock() {
    let _serial = serial();
    for iso in mechanisms() {
        // The CPU limit, not the (generous) wall clock, must end it: SIGXCPU after 1 CPU second,
        // or SIGKILL after 2 where SIGXCPU is ignored (PID 1 of a namespace).
        let l = SandboxLimits {
            cpu_secs: 1,
            wall_secs: 20.0,
            ..limits(iso)
        };
        let t = Instant::now();
        let o = py("while True: pass", &l);
        assert!(
            matches!(
                o.status,
                SandboxStatus::Killed {
                    signal: libc::SIGXCPU | libc::SIGKILL
                }
            ),
            "{iso:?}: {o:#?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{iso:?}: {:?}",
            t.elapsed()
        );

        let l = SandboxLimits {
            wall_secs: 1.0,
            ..limits(iso)
        };
        let t = Instant::now();
        let o = py("import time\nwhile True: time.sleep(1)", &l);
        assert_eq!(o.status, SandboxStatus::TimedOut, "{iso:?}");
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{iso:?}: {:?}",
            t.elapsed()
        );
        assert!(o.wall_secs >= 1.0);
    }
}

/// Forks children that sleep, as many as it can (up to 200), and prints how many it got; the
/// process limit must stop it. Then the children must all be gone when the call returns.
#[test]
fn process_count_is_limited_and_nothing_outlives_the_run() {
    let _serial = serial();
    for iso in mechanisms() {
        let caps = capabilities();
        if caps.root || iso == Isolation::Namespaces {
            // Per-run accounting (fresh uid or own user namespace): the limit is exact.
        } else {
            eprintln!(
                "{iso:?}: RLIMIT_NPROC counts all of this user's processes here; \
                 checking the cleanup only"
            );
        }
        let m = marker("nproc");
        let code = "import os, sys, time\n\
                    n = 0\n\
                    for _ in range(200):\n\
                    \x20   try:\n\
                    \x20       pid = os.fork()\n\
                    \x20   except OSError:\n\
                    \x20       break\n\
                    \x20   if pid == 0:\n\
                    \x20       time.sleep(60)\n\
                    \x20       os._exit(0)\n\
                    \x20   n += 1\n\
                    print(n, flush=True)\n";
        let l = SandboxLimits {
            max_processes: 8,
            ..limits(iso)
        };
        let o = run_sandboxed("python3", &["-c", code, &m], &[], &l).unwrap();
        assert_eq!(o.status, SandboxStatus::Passed, "{iso:?}: {o:#?}");
        let forked: usize = o.stdout.trim().parse().unwrap();
        if caps.root || iso == Isolation::Namespaces {
            assert!(
                forked < 8,
                "{iso:?}: forked {forked} children with max_processes 8"
            );
        }
        assert!(gone(&m), "{iso:?}: children of the run are still alive");
    }
}

/// A real fork bomb: every process forks forever. Contained by the process limit, ended by the
/// wall clock, and nothing of it is left; the call returns promptly.
#[test]
fn a_fork_bomb_is_contained_and_killed() {
    let _serial = serial();
    let caps = capabilities();
    for iso in mechanisms() {
        if !caps.root && iso != Isolation::Namespaces {
            eprintln!("{iso:?}: not running a fork bomb where RLIMIT_NPROC is not per run");
            continue;
        }
        let m = marker("forkbomb");
        let code = "import os\n\
                    while True:\n\
                    \x20   try:\n\
                    \x20       os.fork()\n\
                    \x20   except OSError:\n\
                    \x20       pass\n";
        let l = SandboxLimits {
            max_processes: 6,
            cpu_secs: 30,
            wall_secs: 2.0,
            ..limits(iso)
        };
        let t = Instant::now();
        let o = run_sandboxed("python3", &["-c", code, &m], &[], &l).unwrap();
        assert_eq!(o.status, SandboxStatus::TimedOut, "{iso:?}: {o:#?}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{iso:?}: {:?}",
            t.elapsed()
        );
        assert!(gone(&m), "{iso:?}: fork bomb processes survived the run");
    }
}

/// A daemon that leaves the process group (double fork + setsid) must still be killed.
#[test]
fn a_daemon_that_leaves_the_process_group_is_killed() {
    let _serial = serial();
    let caps = capabilities();
    for iso in mechanisms() {
        if !caps.root && iso != Isolation::Namespaces {
            eprintln!(
                "{iso:?}: as non-root without a PID namespace a setsid daemon escapes \
                 the process-group kill (documented); not tested"
            );
            continue;
        }
        let m = marker("daemon");
        let code = "import os, time\n\
                    if os.fork() == 0:\n\
                    \x20   os.setsid()\n\
                    \x20   if os.fork() == 0:\n\
                    \x20       time.sleep(60)\n\
                    \x20   os._exit(0)\n\
                    time.sleep(0.2)\n";
        let o = run_sandboxed("python3", &["-c", code, &m], &[], &limits(iso)).unwrap();
        assert_eq!(o.status, SandboxStatus::Passed, "{iso:?}: {o:#?}");
        assert!(gone(&m), "{iso:?}: the daemon outlived the run");
    }
}

#[test]
fn a_memory_hog_fails_under_the_limit() {
    let _serial = serial();
    for iso in mechanisms() {
        let l = SandboxLimits {
            memory_bytes: 256 << 20,
            ..limits(iso)
        };
        // 1 GiB would be no problem for this machine without the limit.
        let o = py("b = bytearray(1 << 30)\nprint('allocated', len(b))", &l);
        assert!(!o.status.passed(), "{iso:?}: {o:#?}");
        assert!(!o.stdout.contains("allocated"));
        assert!(o.stderr.contains("MemoryError"), "{iso:?}: {}", o.stderr);
    }
}

#[test]
fn a_file_larger_than_the_limit_cannot_be_written() {
    let _serial = serial();
    for iso in mechanisms() {
        let l = SandboxLimits {
            max_file_bytes: 1 << 20,
            ..limits(iso)
        };
        let o = py(
            "open('big', 'wb').write(b'x' * (4 << 20))\nprint('wrote')",
            &l,
        );
        assert!(!o.status.passed(), "{iso:?}: {o:#?}");
        assert!(o.stderr.contains("File too large"), "{iso:?}: {}", o.stderr);
    }
}

/// Writes to a world-writable directory of the test (so only the sandbox can stop it), to /tmp
/// and to /dev/shm, by absolute path. (In namespace mode /dev/shm is a private tmpfs: the write
/// succeeds there but must not reach the real one.)
#[test]
fn writing_outside_the_working_directory_is_prevented() {
    let _serial = serial();
    use std::os::unix::fs::PermissionsExt;
    for iso in mechanisms() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::set_permissions(outside.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let m = marker("escape");
        let targets = [
            outside.path().join("escaped.txt"),
            std::env::temp_dir().join(format!("{m}.txt")),
            std::path::PathBuf::from(format!("/dev/shm/{m}.txt")),
        ];
        let mut code = String::from("import sys\nn = 0\n");
        for t in &targets[..2] {
            code.push_str(&format!(
                "try:\n    open({:?}, 'w').write('escaped')\n    n += 1\nexcept OSError as e:\n    print(e)\n",
                t.display().to_string()
            ));
        }
        code.push_str(&format!(
            "try:\n    open({:?}, 'w').write('escaped')\nexcept OSError as e:\n    print(e)\n",
            targets[2].display().to_string()
        ));
        code.push_str("open('inside.txt', 'w').write('fine')\nprint('written outside:', n)\n");
        let o = py(&code, &limits(iso));
        assert_eq!(o.status, SandboxStatus::Passed, "{iso:?}: {o:#?}");
        let escaped: Vec<_> = targets.iter().filter(|t| t.exists()).collect();
        for t in &targets {
            let _ = std::fs::remove_file(t);
        }
        if o.isolation.filesystem_isolated {
            assert!(
                escaped.is_empty(),
                "{iso:?}: wrote {escaped:?}\n{}",
                o.stdout
            );
            assert!(o.stdout.contains("written outside: 0"), "{}", o.stdout);
        } else {
            // The control: without filesystem isolation the same program does write there,
            // which shows that the assertion above can fail.
            eprintln!("{iso:?}: no filesystem isolation (documented); it wrote {escaped:?}");
            assert!(!escaped.is_empty());
        }
    }
}

/// Connects to 127.0.0.1 on a port this test listens on.
#[test]
fn network_connections_fail_where_isolation_is_available() {
    let _serial = serial();
    for iso in mechanisms() {
        for allow in [false, true] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let code = format!(
                "import socket, sys\n\
                 try:\n\
                 \x20   socket.create_connection(('127.0.0.1', {port}), timeout=3).close()\n\
                 except OSError as e:\n\
                 \x20   print('blocked:', e)\n\
                 \x20   sys.exit(3)\n\
                 print('connected')\n"
            );
            let l = SandboxLimits {
                network: allow,
                ..limits(iso)
            };
            let o = py(&code, &l);
            listener.set_nonblocking(true).unwrap();
            let accepted = listener.accept().is_ok();
            if !allow && o.isolation.tcp_blocked {
                assert_eq!(
                    o.status,
                    SandboxStatus::Failed { code: 3 },
                    "{iso:?}: {o:#?}"
                );
                assert!(!accepted, "{iso:?}: the listener saw a connection");
            } else {
                if !allow {
                    eprintln!("{iso:?}: network not isolated (documented)");
                }
                // The control: with the network allowed the same program connects.
                assert_eq!(
                    o.status,
                    SandboxStatus::Passed,
                    "{iso:?} network={allow}: {o:#?}"
                );
                assert!(accepted);
            }
            assert_eq!(
                o.isolation.network_isolated,
                !allow && iso == Isolation::Namespaces
            );
        }
    }
}

/// Python's multiprocessing needs a writable /dev/shm: a private one in namespace mode.
#[test]
fn multiprocessing_works() {
    let _serial = serial();
    let code = "import multiprocessing as mp\n\
                if __name__ == '__main__':\n\
                \x20   with mp.Pool(2) as pool:\n\
                \x20       print(sum(pool.map(abs, range(-5, 5))))\n";
    let o = run_sandboxed(
        "python3",
        &["main.py"],
        &[("main.py", code.as_bytes())],
        &SandboxLimits::default(),
    )
    .unwrap();
    assert_eq!(o.status, SandboxStatus::Passed, "{o:#?}");
    assert_eq!(o.stdout, "25\n");
}

#[test]
fn output_is_capped_and_a_flood_does_not_block() {
    let _serial = serial();
    let l = SandboxLimits {
        output_bytes: 1000,
        ..SandboxLimits::default()
    };
    let o = py(
        "import sys\nsys.stdout.write('x' * 5_000_000)\nsys.stderr.write('e' * 5_000)",
        &l,
    );
    assert_eq!(o.status, SandboxStatus::Passed);
    assert_eq!(o.stdout.len(), 1000);
    assert_eq!(o.stderr.len(), 1000);
    assert!(o.stdout_truncated && o.stderr_truncated);
}

/// Whether an attack must fail under the isolation a run reports.
type MustFail = fn(&IsolationReport) -> bool;

/// The evaluator keeps going after each kind of misbehaviour, then runs a normal program.
#[test]
fn the_evaluator_keeps_going_after_each_attack() {
    let _serial = serial();
    let l = SandboxLimits {
        cpu_secs: 1,
        wall_secs: 2.0,
        memory_bytes: 256 << 20,
        max_processes: 6,
        ..SandboxLimits::default()
    };
    let escape = format!(
        "{}/finetune-sandbox-sequence-{}",
        std::env::temp_dir().display(),
        std::process::id()
    );
    let caps = capabilities();
    let per_run_nproc = caps.root || caps.namespaces.is_ok();
    // (program, whether this run's isolation must make it fail)
    let attacks: [(String, MustFail); 6] = [
        ("while True: pass".into(), |_| true),
        (
            "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass".into(),
            |_| true,
        ),
        ("b = bytearray(1 << 30)".into(), |_| true),
        (format!("open({escape:?}, 'w').write('x')"), |r| {
            r.filesystem_isolated
        }),
        (
            "import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)".into(),
            |_| true,
        ),
        // Kill the evaluator (this test process): not visible or not permitted.
        (
            format!(
                "import os, signal\nos.kill({}, signal.SIGKILL)",
                std::process::id()
            ),
            |r| r.uid.is_some() || r.pid_namespace,
        ),
    ];
    for (code, must_fail) in &attacks {
        if !per_run_nproc && (code.contains("os.fork") || code.contains("os.kill")) {
            continue; // would hit this user's other processes
        }
        let o = py(code, &l);
        if must_fail(&o.isolation) {
            assert!(!o.status.passed(), "{code}: {o:#?}");
        }
    }
    let _ = std::fs::remove_file(&escape);
    let o = py("print(sum(range(10)))", &l);
    assert_eq!(o.status, SandboxStatus::Passed);
    assert_eq!(o.stdout, "45\n");
}
