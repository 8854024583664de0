//! The demo's child processes: started from this binary, logged to files, stopped by PID.

use std::{
    fs::File,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context;

pub struct Procs {
    exe: PathBuf,
    logs: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    pub fn new(exe: PathBuf, logs: PathBuf) -> Self {
        Self {
            exe,
            logs,
            children: Vec::new(),
        }
    }

    /// Starts `sagamesh <args>` as `name`, its output in `logs/<name>.log`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(
        &mut self,
        name: &str,
        args: &[S],
    ) -> anyhow::Result<()> {
        let log = self.logs.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.exe)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    /// SIGKILLs `name` (a crash, not a shutdown).
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let (_, child) = self
            .children
            .iter_mut()
            .find(|(n, _)| n == name)
            .with_context(|| format!("no process {name}"))?;
        child.kill().with_context(|| format!("killing {name}"))?;
        let _ = child.wait();
        Ok(())
    }

    /// SIGTERMs every child, waits up to 5s for each to drain, then SIGKILLs what is left.
    pub fn stop_all(&mut self) {
        for (_, child) in &self.children {
            // A PID we started and still hold (not yet waited for, so not reused).
            if let Some(pid) = i32::try_from(child.id())
                .ok()
                .and_then(rustix::process::Pid::from_raw)
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline {
                if matches!(child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
