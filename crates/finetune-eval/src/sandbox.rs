//! Running generated code: one program in a fresh temporary working directory, with resource
//! limits, a wall-clock timeout that kills everything it started, and — where the platform
//! allows — no network, a read-only view of the rest of the filesystem and its own PID
//! namespace.
//!
//! # Mechanisms (Linux)
//!
//! The strongest available one is chosen once per process ([`Isolation::Auto`]), and every
//! [`SandboxOutcome`] says which one ran it ([`IsolationReport`]):
//!
//! * [`Mechanism::Namespaces`] — as root, or as any user where unprivileged user namespaces
//!   work. The child gets its own session, mount, network, PID, IPC and UTS namespaces (plus a
//!   user namespace when not root). In the mount namespace every mount is made read-only
//!   (`mount_setattr(AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID)`) and the working
//!   directory is a fresh tmpfs of at most [`SandboxLimits::disk_bytes`] into which the files
//!   are copied, so the only writable places are the working directory and a private tmpfs on
//!   /dev/shm of the same size (POSIX semaphores, e.g. Python's multiprocessing). The network namespace
//!   has no interfaces but a down loopback: nothing, not even 127.0.0.1, can be reached. The
//!   program is PID 1 of its own PID namespace with a private /proc: it cannot see or signal
//!   any other process, and when it exits or is killed the kernel kills every process it
//!   started, including ones that left the process group with `setsid`. As root the program
//!   runs as a fresh unprivileged uid (per run, in 0x4000_0000..0x5000_0000, no capabilities,
//!   `no_new_privs`), so `RLIMIT_NPROC` counts only that run's processes; without root it runs
//!   as the calling user mapped into a new user namespace, whose `RLIMIT_NPROC` count is also
//!   per run (the count is kept per user namespace).
//! * [`Mechanism::Landlock`] — when namespaces are unavailable but the kernel has Landlock:
//!   writes are allowed only under the working directory (and to /dev/null), the rest of the
//!   filesystem is read/execute only; TCP bind/connect is denied from Landlock ABI 4 (Linux
//!   6.7), abstract Unix sockets and signals to processes outside the sandbox from ABI 6. UDP
//!   and filesystem Unix sockets are not blocked. Processes are contained by process group
//!   (and, as root, by the per-run uid: every process of that uid is killed afterwards).
//! * [`Mechanism::RlimitsOnly`] — session/process group, rlimits and the timeout only; the
//!   program can write wherever its uid may and use the network.
//!
//! In every mode: own session and process group (`setsid`), `RLIMIT_CPU` (SIGXCPU at
//! `cpu_secs`, SIGKILL one second later), `RLIMIT_AS`, `RLIMIT_NPROC`, `RLIMIT_FSIZE`,
//! `RLIMIT_NOFILE`, no core dumps, stdin from /dev/null, stdout and stderr captured up to
//! [`SandboxLimits::output_bytes`] each (the rest is read and dropped), the environment
//! cleared except `PATH` and `LANG`, with `HOME` and `TMPDIR` set to the working directory. On
//! the wall-clock timeout the whole sandbox is killed with SIGKILL and the outcome is
//! [`SandboxStatus::TimedOut`].
//!
//! Not provided by any mode: a syscall filter (seccomp), limits on memory that is not address
//! space (e.g. pipes, kernel memory), protection against kernel bugs. As root the program must be
//! readable and executable by an unprivileged user (e.g. `/usr/bin/python3`, not an
//! interpreter under a mode-700 `/root`): `PATH` is searched as that user.

use crate::EvalError;
use serde::{Deserialize, Serialize};

/// What a sandboxed run may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxLimits {
    /// CPU seconds per process (`RLIMIT_CPU`): SIGXCPU at this, SIGKILL one second later.
    pub cpu_secs: u64,
    /// Wall-clock seconds for the whole run; then everything is killed.
    pub wall_secs: f64,
    /// Address space per process (`RLIMIT_AS`).
    pub memory_bytes: u64,
    /// Processes/threads of the run (`RLIMIT_NPROC`, see the module docs for how it is counted).
    pub max_processes: u64,
    /// Largest file the program may write (`RLIMIT_FSIZE`).
    pub max_file_bytes: u64,
    /// Size of the working directory's tmpfs (namespace mode only).
    pub disk_bytes: u64,
    /// Open file descriptors per process (`RLIMIT_NOFILE`).
    pub max_open_files: u64,
    /// Bytes of stdout and of stderr kept.
    pub output_bytes: usize,
    /// Allow network access (no network namespace, no Landlock network rules).
    pub network: bool,
    /// Which mechanism to use.
    pub isolation: Isolation,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            cpu_secs: 10,
            wall_secs: 20.0,
            memory_bytes: 2 << 30,
            max_processes: 64,
            max_file_bytes: 16 << 20,
            disk_bytes: 64 << 20,
            max_open_files: 256,
            output_bytes: 64 << 10,
            network: false,
            isolation: Isolation::Auto,
        }
    }
}

/// The mechanism asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// The strongest available: namespaces, else Landlock, else rlimits only.
    Auto,
    /// Namespaces or an error.
    Namespaces,
    /// Landlock or an error.
    Landlock,
    /// Session, rlimits and timeout only.
    RlimitsOnly,
}

/// The mechanism that ran a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    Namespaces,
    Landlock { abi: u32 },
    RlimitsOnly,
}

/// What held for one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IsolationReport {
    pub mechanism: Mechanism,
    /// No network at all (an empty network namespace).
    pub network_isolated: bool,
    /// TCP connect/bind denied (true whenever `network_isolated`; Landlock ABI ≥ 4 alone).
    pub tcp_blocked: bool,
    /// Writes outside the working directory are prevented.
    pub filesystem_isolated: bool,
    /// The program ran in its own PID namespace (everything it started dies with it).
    pub pid_namespace: bool,
    /// The unprivileged uid the program ran as (root only; otherwise the caller's uid).
    pub uid: Option<u32>,
}

/// How a sandboxed program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum SandboxStatus {
    /// Exit status 0.
    Passed,
    /// Another exit status.
    Failed { code: i32 },
    /// Ran past the wall-clock limit and was killed.
    TimedOut,
    /// Killed by a signal it did not survive (e.g. 24 = SIGXCPU or 9 = SIGKILL at the CPU
    /// limit, 11 = SIGSEGV).
    Killed { signal: i32 },
}

impl SandboxStatus {
    pub fn passed(&self) -> bool {
        matches!(self, SandboxStatus::Passed)
    }
}

/// The result of one sandboxed run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxOutcome {
    pub status: SandboxStatus,
    /// The first [`SandboxLimits::output_bytes`] of stdout (lossy UTF-8).
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// From start to exit (or kill).
    pub wall_secs: f64,
    pub isolation: IsolationReport,
}

/// What this machine offers, probed once per process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    pub root: bool,
    /// `Ok` when the namespace setup works (probed in a throw-away child), else why not.
    pub namespaces: Result<(), String>,
    /// The Landlock ABI version, if Landlock is enabled.
    pub landlock_abi: Option<u32>,
}

/// What the sandbox can use on this machine (probed once, then cached).
pub fn capabilities() -> &'static Capabilities {
    imp::capabilities()
}

/// Runs `program args…` in a fresh temporary working directory holding `files` (relative
/// paths → contents), within `limits`; the directory is removed afterwards.
///
/// `Err` is for the sandbox itself failing (the program cannot be started, a file name is not
/// a plain relative path, the requested mechanism is unavailable); whatever the program does is
/// an `Ok` outcome.
pub fn run_sandboxed(
    program: &str,
    args: &[&str],
    files: &[(&str, &[u8])],
    limits: &SandboxLimits,
) -> Result<SandboxOutcome, EvalError> {
    validate(program, files, limits)?;
    imp::run(program, args, files, limits)
}

fn validate(
    program: &str,
    files: &[(&str, &[u8])],
    limits: &SandboxLimits,
) -> Result<(), EvalError> {
    if program.is_empty() || program.contains('\0') {
        return Err(EvalError::Sandbox(format!("bad program name {program:?}")));
    }
    for (name, _) in files {
        let path = std::path::Path::new(name);
        let plain = !name.is_empty()
            && !name.contains('\0')
            && path.is_relative()
            && path
                .components()
                .all(|c| matches!(c, std::path::Component::Normal(_)));
        if !plain {
            return Err(EvalError::Sandbox(format!(
                "file name {name:?}: expected a relative path without `..` or `.`"
            )));
        }
    }
    if !(limits.wall_secs > 0.0 && limits.wall_secs.is_finite()) {
        return Err(EvalError::Sandbox(format!(
            "wall_secs {}: expected a positive number of seconds",
            limits.wall_secs
        )));
    }
    if limits.cpu_secs == 0 || limits.max_processes == 0 || limits.memory_bytes == 0 {
        return Err(EvalError::Sandbox(
            "cpu_secs, max_processes and memory_bytes must be positive".into(),
        ));
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
mod imp {
    use super::*;

    pub fn capabilities() -> &'static Capabilities {
        static CAPS: std::sync::OnceLock<Capabilities> = std::sync::OnceLock::new();
        CAPS.get_or_init(|| Capabilities {
            root: false,
            namespaces: Err("not Linux".into()),
            landlock_abi: None,
        })
    }

    pub fn run(
        _program: &str,
        _args: &[&str],
        _files: &[(&str, &[u8])],
        _limits: &SandboxLimits,
    ) -> Result<SandboxOutcome, EvalError> {
        Err(EvalError::Sandbox(
            "sandboxed execution is implemented for Linux only".into(),
        ))
    }
}

#[cfg(target_os = "linux")]
mod imp {
    use super::*;
    use std::ffi::{CStr, CString};
    use std::hash::{BuildHasher, Hasher};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    // ---- kernel ABI not (uniformly) in the libc crate --------------------------------------

    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOSUID: u64 = 0x2;
    const AT_RECURSIVE: libc::c_uint = 0x8000;

    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }

    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
    const FS_EXECUTE: u64 = 1 << 0;
    const FS_WRITE_FILE: u64 = 1 << 1;
    const FS_READ_FILE: u64 = 1 << 2;
    const FS_READ_DIR: u64 = 1 << 3;
    const FS_TRUNCATE: u64 = 1 << 14;
    const FS_IOCTL_DEV: u64 = 1 << 15;
    const NET_BIND_TCP: u64 = 1 << 0;
    const NET_CONNECT_TCP: u64 = 1 << 1;
    const SCOPE_ABSTRACT_UNIX_SOCKET: u64 = 1 << 0;
    const SCOPE_SIGNAL: u64 = 1 << 1;

    #[repr(C)]
    struct LandlockRulesetAttr {
        handled_access_fs: u64,
        handled_access_net: u64,
        scoped: u64,
    }

    #[repr(C, packed)]
    struct LandlockPathBeneathAttr {
        allowed_access: u64,
        parent_fd: i32,
    }

    /// Every filesystem right Landlock `abi` knows.
    fn landlock_fs_rights(abi: u32) -> u64 {
        let mut rights = (1u64 << 13) - 1; // ABI 1: EXECUTE ..= MAKE_SYM
        if abi >= 2 {
            rights |= 1 << 13; // REFER
        }
        if abi >= 3 {
            rights |= FS_TRUNCATE;
        }
        if abi >= 5 {
            rights |= FS_IOCTL_DEV;
        }
        rights
    }

    fn errno() -> i32 {
        io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    fn cstring(s: impl AsRef<[u8]>) -> Result<CString, EvalError> {
        CString::new(s.as_ref().to_vec())
            .map_err(|_| EvalError::Sandbox("a path or argument contains a NUL byte".into()))
    }

    // ---- capabilities -----------------------------------------------------------------------

    pub fn capabilities() -> &'static Capabilities {
        static CAPS: OnceLock<Capabilities> = OnceLock::new();
        CAPS.get_or_init(|| {
            // SAFETY: plain system calls.
            let root = unsafe { libc::geteuid() } == 0;
            let landlock_abi = {
                // SAFETY: the documented version query (NULL attr, size 0).
                let v = unsafe {
                    libc::syscall(
                        libc::SYS_landlock_create_ruleset,
                        std::ptr::null::<LandlockRulesetAttr>(),
                        0usize,
                        LANDLOCK_CREATE_RULESET_VERSION,
                    )
                };
                (v > 0).then_some(v as u32)
            };
            Capabilities {
                root,
                namespaces: probe_namespaces(root),
                landlock_abi,
            }
        })
    }

    /// Runs the namespace set-up (without the file copy) in a throw-away child.
    fn probe_namespaces(root: bool) -> Result<(), String> {
        let dir = tempfile::Builder::new()
            .prefix("finetune-sandbox-probe-")
            .tempdir()
            .map_err(|e| format!("temporary directory: {e}"))?;
        let plan = NsPlan::new(root, dir.path(), &[], 1 << 20, 0, false, None)
            .map_err(|e| e.to_string())?;
        let mut fds = [0; 2];
        // SAFETY: pipe2 into a 2-element array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(format!("pipe: {}", io::Error::last_os_error()));
        }
        // SAFETY: the child only makes async-signal-safe system calls and then _exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(format!("fork: {}", io::Error::last_os_error()));
        }
        if pid == 0 {
            // SAFETY: in the forked child; no allocation, only system calls.
            unsafe {
                libc::close(fds[0]);
                let code = match enter_namespaces(&plan) {
                    Ok(()) => 0,
                    Err((step, err)) => {
                        let msg = [step as i32, err];
                        libc::write(fds[1], msg.as_ptr().cast(), std::mem::size_of_val(&msg));
                        1
                    }
                };
                libc::_exit(code);
            }
        }
        // SAFETY: closing our copy of the write end; reading the child's report.
        unsafe { libc::close(fds[1]) };
        let mut msg = [0i32; 2];
        // SAFETY: reading at most size_of(msg) bytes into msg.
        let n = unsafe { libc::read(fds[0], msg.as_mut_ptr().cast(), std::mem::size_of_val(&msg)) };
        // SAFETY: our own fd and child.
        unsafe { libc::close(fds[0]) };
        let mut status = 0;
        // SAFETY: reaping our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        if n == std::mem::size_of_val(&msg) as isize {
            let step = Step::from_i32(msg[0]);
            return Err(format!(
                "{}: {}",
                step.describe(),
                io::Error::from_raw_os_error(msg[1])
            ));
        }
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            Ok(())
        } else {
            Err(format!("probe child ended with status {status:#x}"))
        }
    }

    // ---- the per-run plan (everything the child needs, allocated before fork) ---------------

    #[derive(Debug, Clone, Copy)]
    enum Step {
        Unshare = 1,
        SetGroups,
        UidMap,
        GidMap,
        MakePrivate,
        ReadOnly,
        OpenSource,
        MountTmpfs,
        CopyFiles,
    }

    impl Step {
        fn from_i32(v: i32) -> Step {
            match v {
                1 => Step::Unshare,
                2 => Step::SetGroups,
                3 => Step::UidMap,
                4 => Step::GidMap,
                5 => Step::MakePrivate,
                6 => Step::ReadOnly,
                7 => Step::OpenSource,
                8 => Step::MountTmpfs,
                _ => Step::CopyFiles,
            }
        }
        fn describe(self) -> &'static str {
            match self {
                Step::Unshare => "unshare(user/mount/net/pid/ipc/uts namespaces)",
                Step::SetGroups => "write /proc/self/setgroups",
                Step::UidMap => "write /proc/self/uid_map",
                Step::GidMap => "write /proc/self/gid_map",
                Step::MakePrivate => "make / a private mount",
                Step::ReadOnly => "mount_setattr(/, AT_RECURSIVE, read-only)",
                Step::OpenSource => "open the staged files",
                Step::MountTmpfs => "mount a tmpfs on the working directory",
                Step::CopyFiles => "copy the files into the tmpfs",
            }
        }
    }

    /// Namespace set-up of one run, with every string prepared before `fork`.
    struct NsPlan {
        flags: libc::c_int,
        user_ns: bool,
        setgroups_deny: CString,
        uid_map: CString,
        gid_map: CString,
        workdir: CString,
        tmpfs_opts: CString,
        shm_opts: CString,
        /// Directories to create in the tmpfs (absolute, parents first).
        dirs: Vec<CString>,
        /// (relative source under the staged directory, absolute destination).
        files: Vec<(CString, CString)>,
        /// Owner of the copies (root only).
        owner: Option<u32>,
    }

    impl NsPlan {
        fn new(
            root: bool,
            workdir: &Path,
            rel_files: &[&str],
            disk_bytes: u64,
            max_files: u64,
            network: bool,
            owner: Option<u32>,
        ) -> Result<NsPlan, EvalError> {
            let mut flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if !network {
                flags |= libc::CLONE_NEWNET;
            }
            if !root {
                flags |= libc::CLONE_NEWUSER;
            }
            // SAFETY: plain system calls.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            let mut tmpfs_opts = format!(
                "size={},nr_inodes={},mode=0700",
                disk_bytes.max(4096),
                (max_files + rel_files.len() as u64).max(64)
            );
            if let Some(x) = owner {
                tmpfs_opts.push_str(&format!(",uid={x},gid={x}"));
            }
            let mut dirs: Vec<PathBuf> = Vec::new();
            for f in rel_files {
                let mut p = Path::new(f).parent();
                let mut chain = Vec::new();
                while let Some(d) = p.filter(|d| !d.as_os_str().is_empty()) {
                    chain.push(d.to_path_buf());
                    p = d.parent();
                }
                for d in chain.into_iter().rev() {
                    if !dirs.contains(&d) {
                        dirs.push(d);
                    }
                }
            }
            use std::os::unix::ffi::OsStrExt;
            Ok(NsPlan {
                flags,
                user_ns: !root,
                setgroups_deny: cstring("deny")?,
                uid_map: cstring(format!("{uid} {uid} 1\n"))?,
                gid_map: cstring(format!("{gid} {gid} 1\n"))?,
                workdir: cstring(workdir.as_os_str().as_bytes())?,
                tmpfs_opts: cstring(tmpfs_opts)?,
                shm_opts: cstring(format!(
                    "size={},nr_inodes=1024,mode=1777",
                    disk_bytes.max(4096)
                ))?,
                dirs: dirs
                    .iter()
                    .map(|d| cstring(workdir.join(d).as_os_str().as_bytes()))
                    .collect::<Result<_, _>>()?,
                files: rel_files
                    .iter()
                    .map(|f| {
                        Ok((
                            cstring(f)?,
                            cstring(workdir.join(f).as_os_str().as_bytes())?,
                        ))
                    })
                    .collect::<Result<_, EvalError>>()?,
                owner,
            })
        }
    }

    /// Writes `data` to the file `path` (for /proc/self/{uid_map,gid_map,setgroups}).
    /// Async-signal-safe.
    unsafe fn write_file(path: &CStr, data: &CStr) -> Result<(), i32> {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno());
        }
        let bytes = data.to_bytes();
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let e = errno();
        libc::close(fd);
        if n == bytes.len() as isize {
            Ok(())
        } else {
            Err(e)
        }
    }

    /// Enters the namespaces and builds the filesystem view. Runs in a forked child: only
    /// system calls, no allocation.
    unsafe fn enter_namespaces(plan: &NsPlan) -> Result<(), (Step, i32)> {
        if libc::unshare(plan.flags) != 0 {
            return Err((Step::Unshare, errno()));
        }
        if plan.user_ns {
            write_file(c"/proc/self/setgroups", &plan.setgroups_deny)
                .map_err(|e| (Step::SetGroups, e))?;
            write_file(c"/proc/self/uid_map", &plan.uid_map).map_err(|e| (Step::UidMap, e))?;
            write_file(c"/proc/self/gid_map", &plan.gid_map).map_err(|e| (Step::GidMap, e))?;
        }
        if libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err((Step::MakePrivate, errno()));
        }
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        if libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) != 0
        {
            return Err((Step::ReadOnly, errno()));
        }
        // The staged files stay reachable through this descriptor once the tmpfs hides them.
        let src = libc::open(
            plan.workdir.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        );
        if src < 0 {
            return Err((Step::OpenSource, errno()));
        }
        if libc::mount(
            c"tmpfs".as_ptr(),
            plan.workdir.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV,
            plan.tmpfs_opts.as_ptr().cast(),
        ) != 0
        {
            let e = errno();
            libc::close(src);
            return Err((Step::MountTmpfs, e));
        }
        let copied = copy_files(plan, src);
        libc::close(src);
        copied.map_err(|e| (Step::CopyFiles, e))?;
        // A private /dev/shm (POSIX semaphores, e.g. Python's multiprocessing), of the same
        // size; best effort: where there is no /dev/shm the program goes without.
        libc::mount(
            c"tmpfs".as_ptr(),
            c"/dev/shm".as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            plan.shm_opts.as_ptr().cast(),
        );
        Ok(())
    }

    /// Copies the staged files from `src` into the tmpfs. Async-signal-safe.
    unsafe fn copy_files(plan: &NsPlan, src: RawFd) -> Result<(), i32> {
        for d in &plan.dirs {
            if libc::mkdir(d.as_ptr(), 0o755) != 0 {
                return Err(errno());
            }
            if let Some(x) = plan.owner {
                if libc::chown(d.as_ptr(), x, x) != 0 {
                    return Err(errno());
                }
            }
        }
        let mut buf = [0u8; 16384];
        for (rel, dst) in &plan.files {
            let from = libc::openat(src, rel.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if from < 0 {
                return Err(errno());
            }
            let to = libc::open(
                dst.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
                0o755 as libc::c_uint,
            );
            if to < 0 {
                let e = errno();
                libc::close(from);
                return Err(e);
            }
            let mut result = Ok(());
            if let Some(x) = plan.owner {
                if libc::fchown(to, x, x) != 0 {
                    result = Err(errno());
                }
            }
            while result.is_ok() {
                let n = libc::read(from, buf.as_mut_ptr().cast(), buf.len());
                if n < 0 {
                    if errno() == libc::EINTR {
                        continue;
                    }
                    result = Err(errno());
                    break;
                }
                if n == 0 {
                    break;
                }
                let mut off = 0usize;
                while off < n as usize {
                    let w = libc::write(to, buf.as_ptr().add(off).cast(), n as usize - off);
                    if w < 0 {
                        if errno() == libc::EINTR {
                            continue;
                        }
                        result = Err(errno());
                        break;
                    }
                    off += w as usize;
                }
            }
            libc::close(from);
            libc::close(to);
            result?;
        }
        Ok(())
    }

    // ---- rlimits and credentials (child side, async-signal-safe) ----------------------------

    #[derive(Clone, Copy)]
    struct ChildLimits {
        cpu_secs: u64,
        memory_bytes: u64,
        nproc: u64,
        max_file_bytes: u64,
        max_open_files: u64,
    }

    #[cfg(target_env = "gnu")]
    type Resource = libc::__rlimit_resource_t;
    #[cfg(not(target_env = "gnu"))]
    type Resource = libc::c_int;

    unsafe fn set_rlimit(resource: Resource, soft: u64, hard: u64) -> io::Result<()> {
        let lim = libc::rlimit {
            rlim_cur: soft as libc::rlim_t,
            rlim_max: hard as libc::rlim_t,
        };
        if libc::setrlimit(resource, &lim) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    unsafe fn apply_rlimits(l: &ChildLimits) -> io::Result<()> {
        set_rlimit(libc::RLIMIT_CORE, 0, 0)?;
        set_rlimit(libc::RLIMIT_CPU, l.cpu_secs, l.cpu_secs + 1)?;
        set_rlimit(libc::RLIMIT_AS, l.memory_bytes, l.memory_bytes)?;
        set_rlimit(libc::RLIMIT_NPROC, l.nproc, l.nproc)?;
        set_rlimit(libc::RLIMIT_FSIZE, l.max_file_bytes, l.max_file_bytes)?;
        set_rlimit(libc::RLIMIT_NOFILE, l.max_open_files, l.max_open_files)?;
        Ok(())
    }

    /// Drops to `uid` (root only): no supplementary groups, no capabilities.
    unsafe fn drop_to(uid: u32) -> io::Result<()> {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(uid, uid, uid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    unsafe fn no_new_privs() -> io::Result<()> {
        let (one, zero): (libc::c_ulong, libc::c_ulong) = (1, 0);
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The process that stays outside the PID namespace: waits for the program (PID 1 inside),
    /// kills it on SIGTERM/SIGINT/SIGHUP (the evaluator's timeout, or the evaluator dying), and
    /// ends the same way it ended. Never returns.
    unsafe fn supervise(child: libc::pid_t, set: &libc::sigset_t) -> ! {
        // Everything but stdio: the spawn's error pipe must see EOF once the program execs.
        if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
            for fd in 3..4096 {
                libc::close(fd);
            }
        }
        loop {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let sig = libc::sigwaitinfo(set, &mut info);
            if sig == libc::SIGCHLD {
                let mut status = 0;
                if libc::waitpid(child, &mut status, libc::WNOHANG) == child {
                    relay(status);
                }
            } else if sig > 0 {
                libc::kill(child, libc::SIGKILL);
            } else if errno() != libc::EINTR {
                libc::kill(child, libc::SIGKILL);
                let mut status = 0;
                libc::waitpid(child, &mut status, 0);
                relay(status);
            }
        }
    }

    /// Ends this process as `status` says the program ended.
    unsafe fn relay(status: libc::c_int) -> ! {
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            libc::signal(sig, libc::SIG_DFL);
            let mut one: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut one);
            libc::sigaddset(&mut one, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
            libc::_exit(128 + sig);
        }
        libc::_exit(libc::WEXITSTATUS(status));
    }

    // ---- the parent side --------------------------------------------------------------------

    /// A fresh uid for a run as root, in 0x4000_0000..0x5000_0000.
    fn fresh_uid() -> u32 {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        0x4000_0000 + (h.finish() as u32 & 0x0FFF_FFFF)
    }

    /// Tasks (threads) of `uid` now, from /proc: RLIMIT_NPROC counts them all.
    fn count_tasks_of(uid: u32) -> u64 {
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return 0;
        };
        let mut n = 0;
        for e in entries.flatten() {
            if !e
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse::<u64>().ok())
            };
            if field("Uid:") == Some(uid as u64) {
                n += field("Threads:").unwrap_or(1);
            }
        }
        n
    }

    /// Kills every process of `uid` (a per-run uid of a root run) from a helper running as
    /// that uid: `kill(-1)` reaches exactly the processes that uid may signal.
    fn kill_all_of(uid: u32) {
        // SAFETY: the child only makes system calls and _exits.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            unsafe {
                if drop_to(uid).is_err() {
                    libc::_exit(1);
                }
                // One pass reaches every process of the uid: kill(-1) walks all processes under
                // the task-list lock, and a fork whose parent has SIGKILL pending is abandoned.
                // (Its return value says nothing here: it is 0 whenever any other process
                // exists, permitted or not.)
                libc::kill(-1, libc::SIGKILL);
                libc::_exit(0);
            }
        }
        if pid > 0 {
            let mut status = 0;
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
        }
    }

    fn landlock_ruleset(
        abi: u32,
        workdir: &Path,
        network: bool,
    ) -> Result<(OwnedFd, bool), EvalError> {
        let fs = landlock_fs_rights(abi);
        let net = if !network && abi >= 4 {
            NET_BIND_TCP | NET_CONNECT_TCP
        } else {
            0
        };
        let scoped = if !network && abi >= 6 {
            SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL
        } else {
            0
        };
        let attr = LandlockRulesetAttr {
            handled_access_fs: fs,
            handled_access_net: net,
            scoped,
        };
        let size = match abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => 24,
        };
        // SAFETY: attr is valid for `size` bytes.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                &attr as *const LandlockRulesetAttr,
                size as usize,
                0u32,
            )
        };
        if fd < 0 {
            return Err(EvalError::Sandbox(format!(
                "landlock_create_ruleset: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: a fresh descriptor we own.
        let ruleset = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
        let file_rights = FS_READ_FILE
            | FS_WRITE_FILE
            | if abi >= 3 { FS_TRUNCATE } else { 0 }
            | if abi >= 5 { FS_IOCTL_DEV } else { 0 };
        let rules: [(&Path, u64); 3] = [
            (Path::new("/"), FS_EXECUTE | FS_READ_FILE | FS_READ_DIR),
            (workdir, fs),
            (Path::new("/dev/null"), file_rights),
        ];
        for (path, access) in rules {
            let file = std::fs::File::options()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(path)
                .map_err(|e| EvalError::Sandbox(format!("{}: {e}", path.display())))?;
            let rule = LandlockPathBeneathAttr {
                allowed_access: access,
                parent_fd: file.as_raw_fd(),
            };
            // SAFETY: rule is a valid path-beneath attribute.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_landlock_add_rule,
                    ruleset.as_raw_fd(),
                    LANDLOCK_RULE_PATH_BENEATH,
                    &rule as *const LandlockPathBeneathAttr,
                    0u32,
                )
            };
            if r != 0 {
                return Err(EvalError::Sandbox(format!(
                    "landlock_add_rule {}: {}",
                    path.display(),
                    io::Error::last_os_error()
                )));
            }
        }
        Ok((ruleset, net != 0))
    }

    enum Plan {
        Namespaces(NsPlan),
        Landlock(OwnedFd),
        RlimitsOnly,
    }

    pub fn run(
        program: &str,
        args: &[&str],
        files: &[(&str, &[u8])],
        limits: &SandboxLimits,
    ) -> Result<SandboxOutcome, EvalError> {
        let caps = capabilities();
        let mechanism = match limits.isolation {
            Isolation::Auto => {
                if caps.namespaces.is_ok() {
                    Mechanism::Namespaces
                } else if let Some(abi) = caps.landlock_abi {
                    Mechanism::Landlock { abi }
                } else {
                    Mechanism::RlimitsOnly
                }
            }
            Isolation::Namespaces => match &caps.namespaces {
                Ok(()) => Mechanism::Namespaces,
                Err(why) => {
                    return Err(EvalError::Sandbox(format!("namespaces unavailable: {why}")))
                }
            },
            Isolation::Landlock => match caps.landlock_abi {
                Some(abi) => Mechanism::Landlock { abi },
                None => return Err(EvalError::Sandbox("Landlock is not enabled".into())),
            },
            Isolation::RlimitsOnly => Mechanism::RlimitsOnly,
        };

        let dir = tempfile::Builder::new()
            .prefix("finetune-sandbox-")
            .tempdir()
            .map_err(|e| EvalError::Sandbox(format!("temporary directory: {e}")))?;
        let workdir = dir.path().to_path_buf();
        for (name, data) in files {
            let path = workdir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| EvalError::Io {
                    path: parent.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
            std::fs::write(&path, data).map_err(|e| EvalError::Io {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }

        let uid = caps.root.then(fresh_uid);
        // RLIMIT_NPROC: per-run in namespace mode (fresh uid as root, own user namespace
        // otherwise) and for a fresh uid; otherwise the caller's uid is shared with everything
        // else it runs, so allow what it already has on top.
        let nproc = match (mechanism, uid) {
            (_, Some(_)) | (Mechanism::Namespaces, None) => limits.max_processes,
            // SAFETY: plain system call.
            (_, None) => count_tasks_of(unsafe { libc::getuid() }) + limits.max_processes,
        };
        if let (Some(x), false) = (uid, mechanism == Mechanism::Namespaces) {
            // The program writes its working directory as the fresh uid.
            for entry in walk(&workdir) {
                std::os::unix::fs::lchown(&entry, Some(x), Some(x)).map_err(|e| EvalError::Io {
                    path: entry.clone(),
                    message: format!("chown: {e}"),
                })?;
            }
        }

        let mut tcp_blocked = false;
        let plan = match mechanism {
            Mechanism::Namespaces => {
                let rel: Vec<&str> = files.iter().map(|(n, _)| *n).collect();
                Plan::Namespaces(NsPlan::new(
                    caps.root,
                    &workdir,
                    &rel,
                    limits.disk_bytes,
                    4096,
                    limits.network,
                    uid,
                )?)
            }
            Mechanism::Landlock { abi } => {
                let (fd, tcp) = landlock_ruleset(abi, &workdir, limits.network)?;
                tcp_blocked = tcp;
                Plan::Landlock(fd)
            }
            Mechanism::RlimitsOnly => Plan::RlimitsOnly,
        };
        let report = IsolationReport {
            mechanism,
            network_isolated: mechanism == Mechanism::Namespaces && !limits.network,
            tcp_blocked: tcp_blocked || (mechanism == Mechanism::Namespaces && !limits.network),
            filesystem_isolated: mechanism != Mechanism::RlimitsOnly,
            pid_namespace: mechanism == Mechanism::Namespaces,
            uid,
        };

        let child_limits = ChildLimits {
            cpu_secs: limits.cpu_secs,
            memory_bytes: limits.memory_bytes,
            nproc,
            max_file_bytes: limits.max_file_bytes,
            max_open_files: limits.max_open_files,
        };
        let workdir_c = {
            use std::os::unix::ffi::OsStrExt;
            cstring(workdir.as_os_str().as_bytes())?
        };

        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("HOME", &workdir)
            .env("TMPDIR", &workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for key in ["PATH", "LANG"] {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        if std::env::var_os("PATH").is_none() {
            cmd.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        }

        let start = Instant::now();
        // Kept until the spawn returns (the Landlock ruleset descriptor).
        let mut keep: Option<OwnedFd> = None;
        let spawned = match plan {
            Plan::Namespaces(ns) => {
                // SAFETY: the closure runs between fork and exec and makes only
                // async-signal-safe system calls on data prepared before the fork.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setsid() < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Err((_, e)) = enter_namespaces(&ns) {
                            return Err(io::Error::from_raw_os_error(e));
                        }
                        set_rlimit(libc::RLIMIT_CORE, 0, 0)?;
                        let mut set: libc::sigset_t = std::mem::zeroed();
                        let mut old: libc::sigset_t = std::mem::zeroed();
                        libc::sigemptyset(&mut set);
                        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
                            libc::sigaddset(&mut set, s);
                        }
                        libc::sigprocmask(libc::SIG_BLOCK, &set, &mut old);
                        // The evaluator dying kills the sandbox.
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                        let pid = libc::fork();
                        if pid < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if pid > 0 {
                            supervise(pid, &set);
                        }
                        // PID 1 of the new namespace.
                        libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
                        // A /proc of this PID namespace (best effort: a masked host /proc
                        // refuses it in a user namespace; the host one stays, read-only).
                        libc::mount(
                            c"proc".as_ptr(),
                            c"/proc".as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                            std::ptr::null(),
                        );
                        if libc::chdir(workdir_c.as_ptr()) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Some(x) = uid {
                            drop_to(x)?;
                        }
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                        apply_rlimits(&child_limits)?;
                        no_new_privs()
                    });
                }
                cmd.spawn()
            }
            Plan::Landlock(fd) => {
                let ruleset = fd.as_raw_fd();
                keep = Some(fd);
                // SAFETY: as above.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setsid() < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if libc::chdir(workdir_c.as_ptr()) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Some(x) = uid {
                            drop_to(x)?;
                        }
                        apply_rlimits(&child_limits)?;
                        no_new_privs()?;
                        if libc::syscall(libc::SYS_landlock_restrict_self, ruleset, 0u32) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                cmd.spawn()
            }
            Plan::RlimitsOnly => {
                // SAFETY: as above.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::setsid() < 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if libc::chdir(workdir_c.as_ptr()) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        if let Some(x) = uid {
                            drop_to(x)?;
                        }
                        apply_rlimits(&child_limits)?;
                        no_new_privs()
                    });
                }
                cmd.spawn()
            }
        };
        drop(keep);
        let mut child = spawned.map_err(|e| {
            let hint = if uid.is_some() && e.kind() == io::ErrorKind::PermissionDenied {
                " (as root the program runs as an unprivileged uid, which must be able to \
                 read and execute it: e.g. /usr/bin/python3, not an interpreter under /root)"
            } else {
                ""
            };
            EvalError::Sandbox(format!("cannot start {program}: {e}{hint}"))
        })?;
        let pid = child.id() as libc::pid_t;

        let mut out = Capture::new(child.stdout.take().map(OwnedFd::from), limits.output_bytes);
        let mut err = Capture::new(child.stderr.take().map(OwnedFd::from), limits.output_bytes);
        // SAFETY: pidfd_open on our own unreaped child.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
        // SAFETY: a fresh descriptor we own (when non-negative).
        let pidfd = (pidfd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) });

        let deadline = start + Duration::from_secs_f64(limits.wall_secs);
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = child
                .try_wait()
                .map_err(|e| EvalError::Sandbox(e.to_string()))?
            {
                break status;
            }
            let now = Instant::now();
            if now >= deadline {
                timed_out = true;
                break kill_sandbox(&mut child, pid, mechanism, &mut out, &mut err)?;
            }
            let wait = (deadline - now).min(Duration::from_millis(if pidfd.is_some() {
                1000
            } else {
                10
            }));
            poll_once(&mut out, &mut err, pidfd.as_ref(), wait);
        };
        let wall_secs = start.elapsed().as_secs_f64();
        // Whatever the program left behind. In namespace mode nothing is (the PID namespace
        // died with its PID 1); otherwise the process group, and as root every process of the
        // run's uid, including ones that left the group.
        if mechanism != Mechanism::Namespaces {
            // SAFETY: our child's process group (setsid made it pgid = pid).
            unsafe { libc::killpg(pid, libc::SIGKILL) };
        }
        if let Some(x) = uid {
            kill_all_of(x);
        }
        // What is still buffered in the pipes; a writer that escaped everything above (non-root
        // without namespaces, after `setsid`) gets a short grace period, then the pipes close.
        let drain_until = Instant::now() + Duration::from_millis(200);
        while (out.open() || err.open()) && Instant::now() < drain_until {
            poll_once(&mut out, &mut err, None, Duration::from_millis(20));
        }
        drop(dir);

        let status = if timed_out {
            SandboxStatus::TimedOut
        } else if let Some(code) = status.code() {
            if code == 0 {
                SandboxStatus::Passed
            } else {
                SandboxStatus::Failed { code }
            }
        } else {
            SandboxStatus::Killed {
                signal: status.signal().unwrap_or(0),
            }
        };
        Ok(SandboxOutcome {
            status,
            stdout: String::from_utf8_lossy(&out.buf).into_owned(),
            stderr: String::from_utf8_lossy(&err.buf).into_owned(),
            stdout_truncated: out.truncated,
            stderr_truncated: err.truncated,
            wall_secs,
            isolation: report,
        })
    }

    /// Kills the whole sandbox and reaps it.
    fn kill_sandbox(
        child: &mut std::process::Child,
        pid: libc::pid_t,
        mechanism: Mechanism,
        out: &mut Capture,
        err: &mut Capture,
    ) -> Result<std::process::ExitStatus, EvalError> {
        if mechanism == Mechanism::Namespaces {
            // The supervisor kills PID 1 of the namespace, which takes everything with it.
            // SAFETY: our unreaped child.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until {
                if let Some(s) = child
                    .try_wait()
                    .map_err(|e| EvalError::Sandbox(e.to_string()))?
                {
                    return Ok(s);
                }
                poll_once(out, err, None, Duration::from_millis(5));
            }
        }
        // SAFETY: our child's process group, then the child itself.
        unsafe {
            libc::killpg(pid, libc::SIGKILL);
            libc::kill(pid, libc::SIGKILL);
        }
        child.wait().map_err(|e| EvalError::Sandbox(e.to_string()))
    }

    /// Files and directories under `root` (for chown), root included.
    fn walk(root: &Path) -> Vec<PathBuf> {
        let mut all = vec![root.to_path_buf()];
        let mut i = 0;
        while i < all.len() {
            if all[i].is_dir() && !all[i].is_symlink() {
                if let Ok(rd) = std::fs::read_dir(&all[i]) {
                    let children: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
                    all.extend(children);
                }
            }
            i += 1;
        }
        all
    }

    /// One captured pipe: keeps the first `cap` bytes, reads and drops the rest.
    struct Capture {
        fd: Option<OwnedFd>,
        buf: Vec<u8>,
        cap: usize,
        truncated: bool,
    }

    impl Capture {
        fn new(fd: Option<OwnedFd>, cap: usize) -> Capture {
            if let Some(fd) = &fd {
                // SAFETY: fcntl on our own descriptor.
                unsafe {
                    let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
                    libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
            Capture {
                fd,
                buf: Vec::new(),
                cap,
                truncated: false,
            }
        }

        fn open(&self) -> bool {
            self.fd.is_some()
        }

        /// Reads what is available; closes on EOF or error.
        fn read_available(&mut self) {
            let Some(fd) = &self.fd else { return };
            let mut chunk = [0u8; 65536];
            loop {
                // SAFETY: reading into a local buffer.
                let n =
                    unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
                if n > 0 {
                    let n = n as usize;
                    let room = self.cap.saturating_sub(self.buf.len());
                    self.buf.extend_from_slice(&chunk[..n.min(room)]);
                    if n > room {
                        self.truncated = true;
                    }
                    continue;
                }
                if n < 0 {
                    let e = errno();
                    if e == libc::EINTR {
                        continue;
                    }
                    if e == libc::EAGAIN {
                        return;
                    }
                }
                self.fd = None; // EOF or a real error
                return;
            }
        }
    }

    /// Waits up to `wait` for output or the child's exit, then reads what is there.
    fn poll_once(out: &mut Capture, err: &mut Capture, pidfd: Option<&OwnedFd>, wait: Duration) {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(3);
        for fd in [out.fd.as_ref(), err.fd.as_ref(), pidfd]
            .into_iter()
            .flatten()
        {
            fds.push(libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        let ms = wait.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: fds is a valid array of fds.len() entries.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        out.read_available();
        err.read_available();
    }
}

#[cfg(test)]
mod tests;
