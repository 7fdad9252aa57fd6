//! The embedded default database: a private PostgreSQL cluster started from the machine's own
//! PostgreSQL binaries in a state directory, so that a new user needs no set-up.
//!
//! The cluster listens on 127.0.0.1 only, on a port chosen once and kept in the state
//! directory, with trust authentication for its own `arrears` role. It keeps running after the
//! command that started it (the next command reuses it); `arrears embedded stop` stops it.
//! initdb refuses to run as root, so as root the cluster belongs to the `postgres` system user
//! (or `nobody`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error(
        "no database configured (DATABASE_URL or database.url) and no PostgreSQL server binaries \
         (initdb, pg_ctl) found on PATH or under /usr/lib/postgresql/*/bin: install PostgreSQL \
         (Debian/Ubuntu: `apt-get install postgresql`) or set DATABASE_URL"
    )]
    NoBinaries,
    #[error("state directory {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "running as root and no unprivileged user (postgres or nobody) exists to own the cluster"
    )]
    NoUser,
    #[error("{what} failed ({status}); see {log}")]
    Command {
        what: String,
        status: String,
        log: PathBuf,
    },
}

/// A started embedded cluster.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub url: String,
    pub data_dir: PathBuf,
    pub bin_dir: PathBuf,
    pub port: u16,
}

struct RunAs {
    uid: u32,
    gid: u32,
}

const ROLE: &str = "arrears";

/// Starts (or reuses) the cluster under `state_dir` and returns the URL of its `arrears`
/// database (which this function does not create: the caller does, over SQL).
pub fn ensure_started(state_dir: &Path) -> Result<Embedded, EmbeddedError> {
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| EmbeddedError::Io { path, source }
    };
    let bin_dir = find_bin_dir().ok_or(EmbeddedError::NoBinaries)?;
    fs::create_dir_all(state_dir).map_err(io_err(state_dir))?;
    let state_dir = fs::canonicalize(state_dir).map_err(io_err(state_dir))?;
    let _lock = FileLock::acquire(&state_dir.join("lock")).map_err(io_err(&state_dir))?;
    let run_as = run_as_user()?;
    let data_dir = data_dir_for(&state_dir, run_as.as_ref());
    let log = data_dir.with_extension("log");

    if !data_dir.join("PG_VERSION").exists() {
        fs::create_dir_all(&data_dir).map_err(io_err(&data_dir))?;
        fs::set_permissions(&data_dir, fs::Permissions::from_mode(0o700))
            .map_err(io_err(&data_dir))?;
        if let Some(u) = &run_as {
            std::os::unix::fs::chown(&data_dir, Some(u.uid), Some(u.gid))
                .map_err(io_err(&data_dir))?;
            ensure_writable_by(&log, u).map_err(io_err(&log))?;
        }
        let mut cmd = Command::new(bin_dir.join("initdb"));
        cmd.arg("-D").arg(&data_dir).args([
            "-U",
            ROLE,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ]);
        run(cmd, run_as.as_ref(), "initdb", &log)?;
    }

    let port_file = state_dir.join("port");
    let mut port: u16 = fs::read_to_string(&port_file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if port != 0 && is_running(&bin_dir, &data_dir, run_as.as_ref()) {
        return Ok(Embedded {
            url: url(port),
            data_dir,
            bin_dir,
            port,
        });
    }
    if let Some(u) = &run_as {
        ensure_writable_by(&log, u).map_err(io_err(&log))?;
    }
    // Two tries: the remembered port may have been taken by something else meanwhile.
    for attempt in 0..2 {
        if port == 0 || attempt > 0 || !port_is_free(port) {
            port = free_port().map_err(io_err(&state_dir))?;
        }
        let mut cmd = Command::new(bin_dir.join("pg_ctl"));
        cmd.arg("-D").arg(&data_dir).arg("-l").arg(&log).args(["-w", "-t", "60", "-o"]).arg(format!(
            "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=100"
        ));
        cmd.arg("start");
        match run(cmd, run_as.as_ref(), "pg_ctl start", &log) {
            Ok(()) => {
                fs::write(&port_file, port.to_string()).map_err(io_err(&port_file))?;
                return Ok(Embedded {
                    url: url(port),
                    data_dir,
                    bin_dir,
                    port,
                });
            }
            Err(e) if attempt == 1 => return Err(e),
            Err(_) => continue,
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// Stops the cluster under `state_dir` if it runs. Returns whether it was running.
pub fn stop(state_dir: &Path) -> Result<bool, EmbeddedError> {
    let bin_dir = find_bin_dir().ok_or(EmbeddedError::NoBinaries)?;
    let state_dir = match fs::canonicalize(state_dir) {
        Ok(p) => p,
        Err(_) => return Ok(false),
    };
    let run_as = run_as_user()?;
    let data_dir = data_dir_for(&state_dir, run_as.as_ref());
    if !is_running(&bin_dir, &data_dir, run_as.as_ref()) {
        return Ok(false);
    }
    let mut cmd = Command::new(bin_dir.join("pg_ctl"));
    cmd.arg("-D")
        .arg(&data_dir)
        .args(["-m", "fast", "-w", "stop"]);
    run(
        cmd,
        run_as.as_ref(),
        "pg_ctl stop",
        &data_dir.with_extension("log"),
    )?;
    Ok(true)
}

fn url(port: u16) -> String {
    format!("postgres://{ROLE}@127.0.0.1:{port}/{ROLE}")
}

/// `state_dir/pgdata`, unless the cluster's owner cannot reach it (a state directory under
/// root's private home, say): then a directory under /var/tmp named after the state directory.
fn data_dir_for(state_dir: &Path, run_as: Option<&RunAs>) -> PathBuf {
    let inside = state_dir.join("pgdata");
    match run_as {
        Some(u) if !reachable_by(state_dir, u) => {
            let hash = state_dir
                .to_string_lossy()
                .bytes()
                .fold(0xcbf29ce484222325u64, |h, b| {
                    (h ^ u64::from(b)).wrapping_mul(0x100000001b3)
                });
            PathBuf::from(format!("/var/tmp/arrears-pgdata-{hash:016x}"))
        }
        _ => inside,
    }
}

fn reachable_by(dir: &Path, u: &RunAs) -> bool {
    let mut cmd = Command::new("test");
    cmd.arg("-x").arg(dir).uid(u.uid).gid(u.gid);
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn ensure_writable_by(file: &Path, u: &RunAs) -> io::Result<()> {
    if !file.exists() {
        fs::write(file, b"")?;
    }
    std::os::unix::fs::chown(file, Some(u.uid), Some(u.gid))
}

fn is_running(bin_dir: &Path, data_dir: &Path, run_as: Option<&RunAs>) -> bool {
    if !data_dir.join("postmaster.pid").exists() {
        return false;
    }
    let mut cmd = Command::new(bin_dir.join("pg_ctl"));
    cmd.arg("-D")
        .arg(data_dir)
        .arg("status")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(u) = run_as {
        cmd.uid(u.uid).gid(u.gid);
    }
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn run(
    mut cmd: Command,
    run_as: Option<&RunAs>,
    what: &str,
    log: &Path,
) -> Result<(), EmbeddedError> {
    if let Some(u) = run_as {
        cmd.uid(u.uid).gid(u.gid);
        // initdb and pg_ctl look at HOME and the current directory; give them ones they can use.
        cmd.env("HOME", "/tmp").current_dir("/");
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| EmbeddedError::Io {
            path: log.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    let _ = fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(log)
        .and_then(|mut f| {
            use std::io::Write;
            writeln!(f, "--- {what} ---\n{text}")
        });
    Err(EmbeddedError::Command {
        what: what.to_string(),
        status: out.status.to_string(),
        log: log.to_path_buf(),
    })
}

/// The machine's PostgreSQL client and server binaries (the newest under
/// /usr/lib/postgresql/*/bin unless PATH has initdb and pg_ctl), also used for pg_dump and
/// pg_restore by `arrears simulate`.
pub fn bin_dir() -> Option<PathBuf> {
    find_bin_dir()
}

fn find_bin_dir() -> Option<PathBuf> {
    let has_tools = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            if has_tools(&d) {
                return Some(d);
            }
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((v, bin))
        })
        .collect();
    candidates.sort();
    candidates.pop().map(|(_, p)| p)
}

fn run_as_user() -> Result<Option<RunAs>, EmbeddedError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        let c = CString::new(name).expect("no NUL in a literal");
        // SAFETY: getpwnam returns NULL or a pointer to static storage that we read at once.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if !pw.is_null() {
            // SAFETY: checked non-null just above.
            let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
            return Ok(Some(RunAs { uid, gid }));
        }
    }
    Err(EmbeddedError::NoUser)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// A port on 127.0.0.1 that nothing listens on now (the embedded cluster's, the benchmarks' servers).
pub(crate) fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// An exclusive advisory lock on a file, so that two commands starting at once do not both
/// run initdb or pg_ctl start.
struct FileLock(fs::File);

impl FileLock {
    fn acquire(path: &Path) -> io::Result<FileLock> {
        use std::os::fd::AsRawFd;
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        // SAFETY: flock on a valid, open descriptor.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as above; the descriptor is still open.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}
