//! Where a process sits in a multi-process run, from the environment launchers set
//! (torchrun-style `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or Slurm's
//! `SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` with `MASTER_ADDR`/`MASTER_PORT` set by the
//! batch script), and a small TCP rendezvous at `MASTER_ADDR:MASTER_PORT` through which process
//! 0 hands every other process a blob (the NCCL unique ids of the run's communicators).
//!
//! The rendezvous listens on `FINETUNE_RENDEZVOUS_PORT`, else `MASTER_PORT` + 1: torchrun's own
//! store may hold `MASTER_PORT` itself.
//!
//! A process runs `gpus` ranks (one thread per local GPU): global rank = process rank × gpus +
//! local index, world = processes × gpus. torchrun with one process per GPU is gpus = 1 and
//! `LOCAL_RANK` picks the device; one Slurm task per node is gpus = GPUs per node.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("rendezvous at {addr}: {message}")]
    Rendezvous { addr: String, message: String },
}

/// This process's place in a multi-process run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    /// Process rank and count.
    pub process: usize,
    pub processes: usize,
    /// Index of this process on its node (picks the first GPU with one process per GPU).
    pub local: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Where process 0 listens for the rendezvous.
    pub rendezvous_port: u16,
}

pub const DEFAULT_PORT: u16 = 29500;

/// Reads the launch environment through `get` (`std::env::var` in the binary); `None` when no
/// launcher variables are set (a single-process run).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<LaunchEnv>, LaunchError> {
    let num = |name: &'static str| -> Result<Option<usize>, LaunchError> {
        match get(name) {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| LaunchError::Env {
                name,
                value: v.clone(),
                message: "not a non-negative integer".into(),
            }),
        }
    };
    let (process, processes, local) = match (num("RANK")?, num("WORLD_SIZE")?) {
        (Some(r), Some(w)) => (r, w, num("LOCAL_RANK")?.unwrap_or(0)),
        (Some(_), None) | (None, Some(_)) => {
            return Err(LaunchError::Env {
                name: "WORLD_SIZE",
                value: get("WORLD_SIZE").unwrap_or_default(),
                message: "RANK and WORLD_SIZE must be set together".into(),
            })
        }
        (None, None) => match (num("SLURM_PROCID")?, num("SLURM_NTASKS")?) {
            (Some(r), Some(w)) => (r, w, num("SLURM_LOCALID")?.unwrap_or(0)),
            _ => return Ok(None),
        },
    };
    if processes == 0 || process >= processes {
        return Err(LaunchError::Env {
            name: "RANK",
            value: process.to_string(),
            message: format!("must be below the world size {processes}"),
        });
    }
    let master_addr = match get("MASTER_ADDR") {
        Some(a) if !a.trim().is_empty() => a.trim().to_string(),
        _ if processes == 1 => "127.0.0.1".to_string(),
        _ => {
            return Err(LaunchError::Env {
                name: "MASTER_ADDR",
                value: String::new(),
                message: "must name the host of process 0 when there are several processes".into(),
            })
        }
    };
    let master_port = match get("MASTER_PORT") {
        None => DEFAULT_PORT,
        Some(p) => p.trim().parse().map_err(|_| LaunchError::Env {
            name: "MASTER_PORT",
            value: p.clone(),
            message: "not a TCP port".into(),
        })?,
    };
    let rendezvous_port = match get("FINETUNE_RENDEZVOUS_PORT") {
        Some(p) => p.trim().parse().map_err(|_| LaunchError::Env {
            name: "FINETUNE_RENDEZVOUS_PORT",
            value: p.clone(),
            message: "not a TCP port".into(),
        })?,
        None => master_port.checked_add(1).ok_or_else(|| LaunchError::Env {
            name: "MASTER_PORT",
            value: master_port.to_string(),
            message: "the rendezvous uses MASTER_PORT + 1: too large".into(),
        })?,
    };
    Ok(Some(LaunchEnv {
        process,
        processes,
        local,
        master_addr,
        master_port,
        rendezvous_port,
    }))
}

const MAGIC: &[u8; 8] = b"ftrdzv01";

/// Hands `blob` from process 0 to every process: process 0 (which passes `Some(blob)`) listens
/// on `MASTER_PORT` and answers each of the other processes, which connect (retrying until
/// `timeout`) and receive it. Returns the blob on every process.
pub fn share_blob(
    env: &LaunchEnv,
    blob: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Vec<u8>, LaunchError> {
    let addr = format!("{}:{}", env.master_addr, env.rendezvous_port);
    let err = |message: String| LaunchError::Rendezvous {
        addr: addr.clone(),
        message,
    };
    if env.process == 0 {
        let blob = blob.ok_or_else(|| err("process 0 has nothing to share".into()))?;
        if env.processes == 1 {
            return Ok(blob);
        }
        let listener = TcpListener::bind(("0.0.0.0", env.rendezvous_port))
            .map_err(|e| err(format!("cannot listen: {e}")))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| err(e.to_string()))?;
        let started = Instant::now();
        let mut seen = vec![false; env.processes];
        let mut served = 1;
        while served < env.processes {
            match listener.accept() {
                Ok((mut s, _)) => {
                    s.set_nonblocking(false).map_err(|e| err(e.to_string()))?;
                    s.set_read_timeout(Some(timeout))
                        .map_err(|e| err(e.to_string()))?;
                    let mut hello = [0u8; 16];
                    s.read_exact(&mut hello)
                        .map_err(|e| err(format!("reading a hello: {e}")))?;
                    if &hello[..8] != MAGIC {
                        continue; // not one of ours (a port scanner, a stale client)
                    }
                    let rank = u64::from_le_bytes(hello[8..].try_into().unwrap_or([0; 8])) as usize;
                    if rank == 0 || rank >= env.processes || seen[rank] {
                        return Err(err(format!("unexpected hello from process {rank}")));
                    }
                    seen[rank] = true;
                    s.write_all(&(blob.len() as u64).to_le_bytes())
                        .and_then(|_| s.write_all(&blob))
                        .map_err(|e| err(format!("answering process {rank}: {e}")))?;
                    served += 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if started.elapsed() > timeout {
                        let missing: Vec<usize> =
                            (1..env.processes).filter(|&r| !seen[r]).collect();
                        return Err(err(format!(
                            "processes {missing:?} did not connect within {} s",
                            timeout.as_secs()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(err(format!("accept: {e}"))),
            }
        }
        return Ok(blob);
    }
    let started = Instant::now();
    loop {
        match TcpStream::connect(&addr) {
            Ok(mut s) => {
                s.set_read_timeout(Some(timeout))
                    .map_err(|e| err(e.to_string()))?;
                let mut hello = MAGIC.to_vec();
                hello.extend((env.process as u64).to_le_bytes());
                s.write_all(&hello)
                    .map_err(|e| err(format!("sending hello: {e}")))?;
                let mut len = [0u8; 8];
                s.read_exact(&mut len)
                    .map_err(|e| err(format!("reading the blob length: {e}")))?;
                let mut blob = vec![0u8; u64::from_le_bytes(len) as usize];
                s.read_exact(&mut blob)
                    .map_err(|e| err(format!("reading the blob: {e}")))?;
                return Ok(blob);
            }
            Err(e) => {
                if started.elapsed() > timeout {
                    return Err(err(format!(
                        "cannot reach process 0 within {} s: {e}",
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<Option<LaunchEnv>, LaunchError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        from_env(|k| m.get(k).cloned())
    }

    #[test]
    fn torchrun_and_slurm_variables() {
        assert_eq!(env(&[]).unwrap(), None);
        let e = env(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "node0"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            e,
            LaunchEnv {
                process: 3,
                processes: 4,
                local: 1,
                master_addr: "node0".into(),
                master_port: 1234,
                rendezvous_port: 1235,
            }
        );
        let e = env(&[
            ("SLURM_PROCID", "1"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
            ("MASTER_ADDR", "n1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.process, e.processes, e.master_port),
            (1, 2, DEFAULT_PORT)
        );
        let bad = env(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "x")])
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("RANK") && bad.contains("below the world size 4"),
            "{bad}"
        );
        let bad = env(&[("RANK", "1"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("MASTER_ADDR"), "{bad}");
        let bad = env(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(bad.contains("RANK=\"x\""), "{bad}");
    }

    #[test]
    fn rendezvous_on_localhost_hands_the_blob_to_every_process() {
        // A free port: bind 0, read it, release it.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let blob: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        let got: Vec<Vec<u8>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..3)
                .map(|p| {
                    let blob = blob.clone();
                    s.spawn(move || {
                        let e = LaunchEnv {
                            process: p,
                            processes: 3,
                            local: 0,
                            master_addr: "127.0.0.1".into(),
                            master_port: 1,
                            rendezvous_port: port,
                        };
                        share_blob(&e, (p == 0).then_some(blob), Duration::from_secs(20)).unwrap()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().unwrap()).collect()
        });
        for g in got {
            assert_eq!(g, blob);
        }
    }
}
