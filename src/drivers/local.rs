//! The `local` driver: functions registered without an `upstream` run on this machine, in
//! runtime processes the gateway starts itself (see [`crate::supervisor`]). This file holds
//! what a local function is made of: its runtime (python3 or nodejs, whose server code is
//! compiled into the binary), its source unpacked under the data dir, and the check that
//! loads its handler once at registration, so that a missing file or a syntax error shows as
//! the function's status, not as a failed call.

use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::config::{LocalConfig, RuntimesConfig};
use crate::model::Runtime;

/// The runtime server's code, as compiled into the binary.
fn code(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python3 => include_str!("../../runtimes/python3/server.py"),
        Runtime::Nodejs => include_str!("../../runtimes/nodejs/server.js"),
    }
}

fn file(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python3 => "python3/server.py",
        Runtime::Nodejs => "nodejs/server.js",
    }
}

/// What a local function runs: enough to start its processes, and to tell whether a new
/// registration changed anything that needs them restarted.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSpec {
    pub function: String,
    pub runtime: Runtime,
    /// `file.function`, as Dispatch's handlers are named.
    pub handler: String,
    /// Where the unpacked source lives: one directory per distinct source and handler.
    pub dir: PathBuf,
    /// The base64 tar.gz the function was registered with.
    pub source: String,
}

/// The largest unpacked source accepted, so that a small archive cannot fill the disk.
const MAX_UNPACKED: u64 = 256 * 1024 * 1024;

/// Where the local driver keeps runtime code and unpacked sources (under the data dir).
#[derive(Debug, Clone)]
pub struct LocalFiles {
    root: PathBuf,
}

impl LocalFiles {
    /// Writes the runtimes' code under `data_dir/local/runtimes` (again on every start, so
    /// that an upgraded binary runs its own runtimes).
    pub fn new(data_dir: &Path) -> std::io::Result<LocalFiles> {
        let root = data_dir.join("local");
        for runtime in [Runtime::Python3, Runtime::Nodejs] {
            let path = root.join("runtimes").join(file(runtime));
            std::fs::create_dir_all(path.parent().expect("a runtime file has a folder"))?;
            if std::fs::read_to_string(&path).ok().as_deref() != Some(code(runtime)) {
                std::fs::write(&path, code(runtime))?;
            }
        }
        Ok(LocalFiles { root })
    }

    pub fn script(&self, runtime: Runtime) -> PathBuf {
        self.root.join("runtimes").join(file(runtime))
    }

    /// The spec of a local function; its directory is named after a digest of what it runs.
    pub fn spec(&self, function: &str, runtime: Runtime, handler: &str, source: &str) -> LocalSpec {
        let mut digest = std::hash::DefaultHasher::new();
        (runtime, handler, source).hash(&mut digest);
        LocalSpec {
            function: function.to_string(),
            runtime,
            handler: handler.to_string(),
            dir: self
                .root
                .join("functions")
                .join(function)
                .join(format!("{:016x}", digest.finish())),
            source: source.to_string(),
        }
    }
}

impl LocalSpec {
    /// Unpacks the source into the spec's directory, unless that was done already. The
    /// archive is unpacked beside it first and renamed into place, so a directory that
    /// exists is always complete.
    pub async fn unpack(&self) -> Result<(), String> {
        if self.dir.is_dir() {
            return Ok(());
        }
        let (source, dir) = (self.source.clone(), self.dir.clone());
        tokio::task::spawn_blocking(move || unpack_into(&source, &dir))
            .await
            .map_err(|e| format!("unpacking the source: {e}"))?
    }

    /// Loads the handler once in a runtime process of its own (`--check`): `Ok` when it
    /// loads, the runtime's reason otherwise (file not found, no such function, a syntax
    /// error with its line).
    pub async fn check(
        &self,
        config: &LocalConfig,
        runtimes: &RuntimesConfig,
        files: &LocalFiles,
    ) -> Result<(), String> {
        let interpreter = runtimes.interpreter(self.runtime);
        let mut child = Command::new(interpreter)
            .arg(files.script(self.runtime))
            .arg("--dir")
            .arg(&self.dir)
            .arg("--handler")
            .arg(&self.handler)
            .arg("--check")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot run the {} interpreter \"{interpreter}\": {e}",
                    self.runtime.as_str()
                )
            })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let timeout = Duration::from_millis(config.start_timeout_ms);
        let line = tokio::time::timeout(timeout, BufReader::new(stdout).lines().next_line()).await;
        match line {
            Err(_) => Err(format!(
                "loading the handler took more than {} ms",
                timeout.as_millis()
            )),
            Ok(Ok(Some(line))) => match serde_json::from_str::<Said>(&line) {
                Ok(Said { ok: Some(true), .. }) => Ok(()),
                Ok(Said {
                    reason: Some(reason),
                    ..
                }) => Err(reason),
                _ => Err(format!("the runtime said something unexpected: {line}")),
            },
            Ok(_) => {
                let status = child.wait().await.map_err(|e| e.to_string())?;
                Err(format!("the runtime exited ({status}) without a word"))
            }
        }
    }
}

/// One line a runtime writes on its stdout (runtimes/README.md).
#[derive(Deserialize)]
pub struct Said {
    pub ok: Option<bool>,
    pub reason: Option<String>,
    pub listening: Option<String>,
}

fn unpack_into(source: &str, dir: &Path) -> Result<(), String> {
    let archive = base64::engine::general_purpose::STANDARD
        .decode(source.trim())
        .map_err(|e| format!("source: not base64 ({e})"))?;
    let parent = dir.parent().expect("a function's folder has a parent");
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let partial = parent.join(format!(".partial-{}", fastrand::u64(..)));
    let unpacked = (|| {
        let gz = flate2::read::GzDecoder::new(archive.as_slice()).take(MAX_UNPACKED);
        tar::Archive::new(gz)
            .unpack(&partial)
            .map_err(|e| format!("source: not a readable tar.gz ({e})"))?;
        std::fs::rename(&partial, dir).map_err(|e| format!("{}: {e}", dir.display()))
    })();
    if unpacked.is_err() {
        let _ = std::fs::remove_dir_all(&partial);
    }
    // Another gateway task may have unpacked the same source meanwhile: that is as good.
    if dir.is_dir() { Ok(()) } else { unpacked }
}
