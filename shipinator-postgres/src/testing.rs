//! A throwaway PostgreSQL cluster for tests, started from the machine's PostgreSQL binaries
//! (Debian/Ubuntu package `postgresql`). Enabled by the `testing` feature.
//!
//! ```no_run
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! use shipinator_postgres::testing::TestCluster;
//!
//! let cluster = TestCluster::shared()?; // one per test binary
//! let url = cluster.create_database().await?; // a fresh database per test
//! let store = shipinator_postgres::PgStore::connect(&url).await?;
//! # let _ = store;
//! # Ok(())
//! # }
//! ```
//!
//! The cluster lives in a temporary directory, listens on 127.0.0.1 on a free port, trusts
//! local connections, and runs with `fsync=on`. It is stopped (`pg_ctl stop -m fast`) and its
//! directory removed when the [`TestCluster`] is dropped, and also by a small guardian process
//! when the test process ends without dropping it (a shared cluster in a `static`, a panic,
//! an abort). When the process runs as root, `initdb` and `pg_ctl` run as the `postgres`
//! user through `runuser`, since PostgreSQL refuses to run as root.

use std::fmt;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use sqlx::Connection;

/// What went wrong starting or driving a [`TestCluster`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HarnessError {
    message: String,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HarnessError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    fn with(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }
}

const INSTALL_HINT: &str = "PostgreSQL server binaries (initdb, pg_ctl) were not found in \
    /usr/lib/postgresql/*/bin nor via `pg_config --bindir`; install them with \
    `apt-get install -y postgresql` (Debian/Ubuntu) and run the tests again";

/// A running throwaway PostgreSQL cluster.
pub struct TestCluster {
    bindir: PathBuf,
    /// Holds `data/`, `sock/` and `server.log`; removed on drop.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    port: u16,
    as_postgres: bool,
    /// Its stdin closing (this process ending) makes the guardian stop the cluster.
    guardian: Mutex<Option<(Child, ChildStdin)>>,
    databases: AtomicU32,
}

impl fmt::Debug for TestCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestCluster")
            .field("root", &self.root)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

fn find_bindir() -> Result<PathBuf, HarnessError> {
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .filter(|p| p.join("initdb").is_file() && p.join("pg_ctl").is_file())
                .collect()
        })
        .unwrap_or_default();
    // Newest major version first.
    candidates.sort_by_key(|p| {
        std::cmp::Reverse(
            p.parent()
                .and_then(|v| v.file_name())
                .and_then(|v| v.to_str())
                .and_then(|v| v.parse::<u32>().ok())
                .unwrap_or(0),
        )
    });
    if let Some(dir) = candidates.into_iter().next() {
        return Ok(dir);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
            return Ok(dir);
        }
    }
    Err(HarnessError::new(INSTALL_HINT))
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> Result<u16, HarnessError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| HarnessError::with("cannot find a free port on 127.0.0.1", e))?;
    let port = listener
        .local_addr()
        .map_err(|e| HarnessError::with("cannot find a free port on 127.0.0.1", e))?
        .port();
    Ok(port)
}

/// Single-quotes `s` for `sh`.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl TestCluster {
    /// The cluster shared by every test of this process, started on first use.
    ///
    /// # Errors
    /// As [`TestCluster::start`]; the error is repeated to every caller.
    pub fn shared() -> Result<&'static TestCluster, HarnessError> {
        static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();
        SHARED
            .get_or_init(|| TestCluster::start().map_err(|e| error_chain(&e)))
            .as_ref()
            .map_err(|e| HarnessError::new(e.clone()))
    }

    /// Creates and starts a new cluster.
    ///
    /// # Errors
    /// When the PostgreSQL binaries are missing (the message says what to install), or
    /// `initdb` or `pg_ctl start` fail (the message includes the server log).
    pub fn start() -> Result<TestCluster, HarnessError> {
        let bindir = find_bindir()?;
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("shipinator-pg-")
            .tempdir()
            .map_err(|e| HarnessError::with("cannot create a temporary directory", e))?;
        let root = dir.path().to_path_buf();
        std::fs::create_dir(root.join("sock"))
            .map_err(|e| HarnessError::with("cannot create the socket directory", e))?;
        if as_postgres {
            run(Command::new("chown").arg("-R").arg("postgres:").arg(&root)).map_err(|e| {
                HarnessError::new(format!(
                    "cannot give {} to the postgres user: {e}",
                    root.display()
                ))
            })?;
        }
        let mut cluster = TestCluster {
            bindir,
            dir: Some(dir),
            root,
            port: 0,
            as_postgres,
            guardian: Mutex::new(None),
            databases: AtomicU32::new(0),
        };
        let data = cluster.data_dir();
        let mut initdb = cluster.pg_command("initdb");
        initdb.arg("-D").arg(&data).args([
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        run(&mut initdb).map_err(|e| HarnessError::new(format!("initdb failed: {e}")))?;
        // A port picked free may be taken before the server binds it: try a few.
        let mut last = None;
        for _ in 0..5 {
            cluster.port = free_port()?;
            match cluster.start_again() {
                Ok(()) => {
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(e);
        }
        cluster.spawn_guardian()?;
        Ok(cluster)
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    fn pg_command(&self, program: &str) -> Command {
        let bin = self.bindir.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(bin);
            c
        } else {
            Command::new(bin)
        };
        cmd.current_dir(&self.root);
        cmd
    }

    fn pg_ctl_stop_line(&self, mode: &str) -> String {
        let pg_ctl = self.bindir.join("pg_ctl");
        let prefix = if self.as_postgres {
            "runuser -u postgres -- "
        } else {
            ""
        };
        format!(
            "{prefix}{} -D {} -m {mode} -w stop",
            sh_quote(&pg_ctl.to_string_lossy()),
            sh_quote(&self.data_dir().to_string_lossy())
        )
    }

    fn spawn_guardian(&self) -> Result<(), HarnessError> {
        let script = format!(
            "read _ignored; {} >/dev/null 2>&1; rm -rf {}",
            self.pg_ctl_stop_line("fast"),
            sh_quote(&self.root.to_string_lossy())
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| HarnessError::with("cannot start the cluster's guardian process", e))?;
        let stdin = child
            .stdin
            .take()
            .ok_or_else(|| HarnessError::new("the guardian process has no stdin"))?;
        *self
            .guardian
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((child, stdin));
        Ok(())
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL of database `name` as the superuser `postgres`.
    pub fn url_for(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.port)
    }

    /// The URL of the `postgres` maintenance database.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// Creates a fresh, empty database and returns its URL.
    ///
    /// # Errors
    /// When the server cannot be reached or refuses.
    pub async fn create_database(&self) -> Result<String, HarnessError> {
        let n = self.databases.fetch_add(1, Ordering::Relaxed);
        let name = format!("test_{}_{n}", std::process::id());
        let mut conn = sqlx::PgConnection::connect(&self.url())
            .await
            .map_err(|e| HarnessError::with("cannot connect to the test cluster", e))?;
        let sql = sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"));
        sqlx::raw_sql(sql)
            .execute(&mut conn)
            .await
            .map_err(|e| HarnessError::with(format!("cannot create database {name}"), e))?;
        let _ = conn.close().await;
        Ok(self.url_for(&name))
    }

    /// Stops the server abruptly (`pg_ctl stop -m immediate`): what a crash or an outage
    /// looks like to clients. Committed data survives; [`start_again`](Self::start_again)
    /// brings it back.
    ///
    /// # Errors
    /// When `pg_ctl` fails.
    pub fn stop_immediate(&self) -> Result<(), HarnessError> {
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"]);
        run(&mut cmd).map_err(|e| HarnessError::new(format!("pg_ctl stop failed: {e}")))
    }

    /// Starts the server (again) on the same port and data directory.
    ///
    /// # Errors
    /// When `pg_ctl start` fails; the message includes the end of the server log.
    pub fn start_again(&self) -> Result<(), HarnessError> {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections=300",
            self.port,
            self.root.join("sock").display()
        );
        let log = self.root.join("server.log");
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "-o"])
            .arg(options)
            .arg("start");
        run(&mut cmd).map_err(|e| {
            HarnessError::new(format!(
                "pg_ctl start failed: {e}\nserver log:\n{}",
                tail(&log)
            ))
        })
    }

    /// Stops the server (`pg_ctl stop -m fast`) and removes its directory. Also done on drop.
    pub fn stop(&mut self) {
        if self.dir.is_none() {
            return;
        }
        let mut cmd = self.pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "stop"]);
        if let Err(e) = run(&mut cmd) {
            tracing::debug!(error = %e, "stopping the test cluster");
        }
        if let Some((mut child, stdin)) = self
            .guardian
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
        {
            drop(stdin);
            let _ = child.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} exited with {}: {} {}",
            Path::new(cmd.get_program()).display(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
