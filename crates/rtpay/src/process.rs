//! Running `rtpay serve` as a child process: for `rtpay bench` and the end-to-end tests, which must
//! measure and test the real binary over real sockets.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A fixed operator token and hash key, so several nodes of one cluster agree.
pub const OPERATOR: &str = "rtpay_op_test_0123456789abcdef0123456789abcdef";
pub const SECRET_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub data: PathBuf,
    /// The ISO 8583 listener, when `--iso8583-listen` was given.
    pub iso8583: Option<SocketAddr>,
}

/// Which keys a spawned `rtpay serve` is given in its environment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeysEnv {
    /// The fixed [`OPERATOR`] token and [`SECRET_KEY`], so several nodes of one cluster agree.
    Fixed,
    /// [`SECRET_KEY`] only: the operator token is `<data>/operator-token` (made on first start).
    SecretOnly,
    /// None: every key comes from the data directory (made there on first start), as
    /// `rtpay keys init` writes them.
    None,
}

/// How to start `rtpay serve`.
pub struct Spawn<'a> {
    pub exe: &'a Path,
    pub data: &'a Path,
    pub postgres: Option<&'a str>,
    pub listen: &'a str,
    /// Which keys the server finds in its environment.
    pub keys: KeysEnv,
    /// How long to wait for the listening line.
    pub wait: Duration,
    /// More `serve` arguments.
    pub args: &'a [&'a str],
    /// Where the server's log (stderr) goes, at debug level; `None`: inherited, warnings only.
    pub log: Option<&'a Path>,
}

impl Spawn<'_> {
    /// Starts the server and waits until it prints its listening address.
    pub fn start(&self) -> std::io::Result<ServerProcess> {
        let mut command = Command::new(self.exe);
        command.arg("serve").arg("--data").arg(self.data).arg("--listen").arg(self.listen).args(self.args);
        // Its account cache by its arguments alone (the tests' and benchmarks' figures assume
        // the default unless they say otherwise).
        command.env_remove("RTPAY_ACCOUNT_CACHE");
        match self.keys {
            KeysEnv::Fixed => command.env("RTPAY_OPERATOR_TOKEN", OPERATOR).env("RTPAY_SECRET_KEY", SECRET_KEY),
            KeysEnv::SecretOnly => command.env_remove("RTPAY_OPERATOR_TOKEN").env("RTPAY_SECRET_KEY", SECRET_KEY),
            KeysEnv::None => {
                for name in
                    ["RTPAY_OPERATOR_TOKEN", "RTPAY_SECRET_KEY", "RTPAY_INDEX_KEY", "RTPAY_KEK", "RTPAY_AUDIT_KEY_FILE"]
                {
                    command.env_remove(name);
                }
                &mut command
            }
        };
        command.stdout(Stdio::piped());
        match self.log {
            None => command.env("RTPAY_LOG", "warn").stderr(Stdio::inherit()),
            Some(path) => command.env("RTPAY_LOG", "debug").stderr(std::fs::File::create(path)?),
        };
        match self.postgres {
            Some(url) => {
                command.arg("--postgres").arg(url);
            }
            // The embedded engine, whatever the caller's environment says.
            None => {
                command.env_remove("RTPAY_POSTGRES");
            }
        }
        let mut child = command.spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut iso8583 = None;
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(a) = line.strip_prefix("rtpay iso8583 listening on ") {
                    iso8583 = a.parse::<SocketAddr>().ok();
                }
                let address = line
                    .strip_prefix("rtpay listening on http://")
                    .or_else(|| line.strip_prefix("rtpay listening on https://"));
                if let Some(addr) = address {
                    let _ = tx.send(addr.parse::<SocketAddr>().map(|a| (a, iso8583)));
                }
            }
        });
        match rx.recv_timeout(self.wait) {
            Ok(Ok((addr, iso8583))) => Ok(ServerProcess { child, addr, data: self.data.to_owned(), iso8583 }),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                Err(std::io::Error::other(format!(
                    "rtpay serve did not start within {:?} (data {})",
                    self.wait,
                    self.data.display()
                )))
            }
        }
    }
}

/// Starts `<exe> serve` with the fixed test keys and waits (at most `wait`) until it listens.
pub fn spawn_serve(
    exe: &Path,
    data: &Path,
    postgres: Option<&str>,
    listen: &str,
    wait: Duration,
) -> std::io::Result<ServerProcess> {
    Spawn { exe, data, postgres, listen, keys: KeysEnv::Fixed, wait, args: &[], log: None }.start()
}

/// CPU time (user and system) from a /proc `stat` file: a process's (all its threads) or a thread's.
fn stat_cpu_time(path: &std::path::Path) -> Option<(String, std::time::Duration)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let (head, tail) = stat.rsplit_once(')')?;
    let name = head.split_once('(')?.1.to_owned();
    let fields: Vec<&str> = tail.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (per_second > 0).then(|| (name, std::time::Duration::from_secs_f64(ticks as f64 / per_second as f64)))
}

/// CPU time a process has used so far (user and system, all threads), from /proc.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    stat_cpu_time(std::path::Path::new(&format!("/proc/{pid}/stat"))).map(|(_, t)| t)
}

/// CPU time of a process's live threads, summed by thread name, from /proc.
pub fn thread_cpu_times(pid: u32) -> std::collections::BTreeMap<String, std::time::Duration> {
    let mut by_name = std::collections::BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        if let Some((name, time)) = stat_cpu_time(&task.path().join("stat")) {
            *by_name.entry(name).or_default() += time;
        }
    }
    by_name
}

/// Where the machine's CPUs spent their time, from /proc/stat's `cpu` line: cumulative ticks,
/// summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// Running anything (user, nice, system, irq, softirq).
    pub busy: u64,
    /// Nothing to run (idle and iowait).
    pub idle: u64,
    /// Wanting to run while the hypervisor ran something else (steal).
    pub stolen: u64,
}

impl MachineTicks {
    pub fn read() -> Option<MachineTicks> {
        MachineTicks::parse(&std::fs::read_to_string("/proc/stat").ok()?)
    }

    /// Parses /proc/stat (see proc(5)): `cpu user nice system idle iowait irq softirq steal ...`.
    /// Guest time is already counted in user and nice.
    fn parse(stat: &str) -> Option<MachineTicks> {
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let field = |i: usize| fields.get(i).copied().unwrap_or(0);
        Some(MachineTicks {
            busy: field(0) + field(1) + field(2) + field(5) + field(6),
            idle: field(3) + field(4),
            stolen: field(7),
        })
    }

    pub fn add(&mut self, more: &MachineTicks) {
        self.busy += more.busy;
        self.idle += more.idle;
        self.stolen += more.stolen;
    }

    /// What was spent between `before` and `self`.
    pub fn since(&self, before: &MachineTicks) -> MachineTicks {
        MachineTicks {
            busy: self.busy.saturating_sub(before.busy),
            idle: self.idle.saturating_sub(before.idle),
            stolen: self.stolen.saturating_sub(before.stolen),
        }
    }
}

/// Resident memory of a process, in KiB, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_ticks_add_up_the_fields_as_proc_stat_names_them() {
        let stat = "cpu  100 5 30 800 20 3 2 40 7 0\ncpu0 50 2 15 400 10 1 1 20 3 0\nintr 1 2\n";
        let ticks = MachineTicks::parse(stat).expect("parses");
        assert_eq!(ticks, MachineTicks { busy: 100 + 5 + 30 + 3 + 2, idle: 800 + 20, stolen: 40 });
        let later = MachineTicks { busy: 200, idle: 900, stolen: 45 };
        let mut spent = later.since(&ticks);
        assert_eq!(spent, MachineTicks { busy: 60, idle: 80, stolen: 5 });
        spent.add(&MachineTicks { busy: 1, idle: 2, stolen: 3 });
        assert_eq!(spent, MachineTicks { busy: 61, idle: 82, stolen: 8 });
        // An older kernel's shorter line counts no steal; a line that is not the total is refused.
        assert_eq!(MachineTicks::parse("cpu  1 2 3 4\n").map(|t| t.stolen), Some(0));
        assert_eq!(MachineTicks::parse("cpu0 1 2 3 4\n"), None);
        assert_eq!(MachineTicks::parse("cpu  1 x 3 4\n"), None);
    }
}
