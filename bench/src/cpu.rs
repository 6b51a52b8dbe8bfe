//! CPU time a measured run cost, by whose threads spent it, read from `/proc` (Linux).
//!
//! On two vCPUs a load generator, a broker and its consumers share the CPUs, so a throughput
//! figure says little without what it cost: this puts the core-seconds next to the bytes. Each
//! thread's time comes from `/proc/self/task/<tid>/schedstat` (nanoseconds on the CPU); the
//! process's from `/proc/self/stat`, which also holds threads that have exited (io_uring's
//! workers come and go), in clock ticks.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::{json, Value};

/// `/proc/<pid>/stat` counts in `USER_HZ` ticks, 100 per second on every Linux ABI.
const ticks_per_s: f64 = 100.0;

/// Whose a thread is, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A shard (`keel-shard-N`): the engine, and the broker's connections.
    Shard,
    /// io_uring's workers (`iou-wrk-N`): the fsyncs and writes the kernel runs off the ring.
    IoWorker,
    /// Keel's other threads (`keel-groups`, `keel-metrics`).
    KeelOther,
    /// Everything else: the load generator (producers, consumers, the engine's closed loop).
    Load,
}

fn role(comm: &str) -> Role {
    if comm.starts_with("keel-shard") {
        Role::Shard
    } else if comm.starts_with("iou-wrk") {
        Role::IoWorker
    } else if comm.starts_with("keel-") && comm != "keel-bench" {
        Role::KeelOther
    } else {
        Role::Load
    }
}

/// What the process and each live thread had spent at one moment.
#[derive(Clone, Debug)]
pub struct CpuSample {
    at: Instant,
    process_s: Option<f64>,
    threads: HashMap<u32, (Role, f64)>,
}

/// Take a sample (`/proc` unreadable: an empty one, and the figures come out as zero).
pub fn sample() -> CpuSample {
    let process_s = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| process_seconds(&s));
    let mut threads = HashMap::new();
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for entry in dir.flatten() {
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse().ok()) else {
                continue;
            };
            let path = entry.path();
            let (Ok(comm), Ok(stat)) = (
                std::fs::read_to_string(path.join("comm")),
                std::fs::read_to_string(path.join("schedstat")),
            ) else {
                continue; // exited meanwhile
            };
            if let Some(s) = schedstat_seconds(&stat) {
                threads.insert(tid, (role(comm.trim_end()), s));
            }
        }
    }
    CpuSample {
        at: Instant::now(),
        process_s,
        threads,
    }
}

/// utime + stime of a `/proc/<pid>/stat` line, in seconds. The name in parentheses may hold
/// spaces and parentheses, so fields are counted after the last `)`.
fn process_seconds(stat: &str) -> Option<f64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of proc(5), so utime (14) and stime (15) are 11 and 12.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / ticks_per_s)
}

/// The first field of a `schedstat` line: nanoseconds on the CPU.
fn schedstat_seconds(line: &str) -> Option<f64> {
    let ns: u64 = line.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// CPU spent between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CpuUse {
    pub wall_s: f64,
    /// The whole process, exited threads included.
    pub process_s: f64,
    /// Keel's threads (shards, io_uring workers, others) alive at both samples.
    pub keel_s: f64,
    /// Of which io_uring's workers.
    pub io_workers_s: f64,
    /// The load generator's threads alive at both samples.
    pub load_s: f64,
}

impl CpuUse {
    pub fn between(before: &CpuSample, after: &CpuSample) -> CpuUse {
        let mut out = CpuUse {
            wall_s: after.at.duration_since(before.at).as_secs_f64(),
            process_s: match (before.process_s, after.process_s) {
                (Some(b), Some(a)) => (a - b).max(0.0),
                _ => 0.0,
            },
            ..CpuUse::default()
        };
        for (tid, &(role, spent)) in &after.threads {
            let Some(&(_, earlier)) = before.threads.get(tid) else {
                continue; // started during the window: only the process total has it
            };
            let s = (spent - earlier).max(0.0);
            match role {
                Role::Load => out.load_s += s,
                Role::IoWorker => {
                    out.io_workers_s += s;
                    out.keel_s += s;
                }
                Role::Shard | Role::KeelOther => out.keel_s += s,
            }
        }
        out
    }

    /// Keel's CPU seconds per GB moved (`mb` megabytes in the window), if anything moved.
    pub fn keel_s_per_gb(&self, mb: f64) -> Option<f64> {
        (mb > 0.0).then(|| self.keel_s / (mb / 1000.0))
    }

    pub fn to_json(self, mb: f64) -> Value {
        json!({
            "wall_s": self.wall_s,
            "process_s": self.process_s,
            "keel_s": self.keel_s,
            "io_workers_s": self.io_workers_s,
            "load_s": self.load_s,
            "keel_s_per_gb": self.keel_s_per_gb(mb),
        })
    }

    /// One line for the terminal; `mb` as for [`keel_s_per_gb`](Self::keel_s_per_gb).
    pub fn describe(&self, what: &str, mb: f64) -> String {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let busy = if self.wall_s > 0.0 {
            100.0 * self.process_s / (self.wall_s * cores as f64)
        } else {
            0.0
        };
        format!(
            "{what}: cpu {:.2} s over {:.2} s ({busy:.0}% of {cores} cores): Keel's threads {:.2} s (io_uring workers {:.2}), load generator {:.2} s; Keel {:.2} core-seconds per GB appended",
            self.process_s,
            self.wall_s,
            self.keel_s,
            self.io_workers_s,
            self.load_s,
            self.keel_s_per_gb(mb).unwrap_or(f64::NAN),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_is_read_after_the_name_whatever_the_name_holds() {
        let line = "4242 (keel (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 \
                    1000 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(process_seconds(line), Some(3.0));
        assert_eq!(process_seconds("garbage"), None);
        assert_eq!(schedstat_seconds("1500000000 20 3\n"), Some(1.5));
    }

    #[test]
    fn threads_count_by_their_names_and_only_when_alive_at_both_samples() {
        let at = Instant::now();
        let before = CpuSample {
            at,
            process_s: Some(10.0),
            threads: HashMap::from([
                (1, (role("keel-bench"), 1.0)),
                (2, (role("keel-shard-0"), 2.0)),
                (3, (role("iou-wrk-2"), 0.5)),
                (4, (role("keel-groups"), 0.1)),
            ]),
        };
        let after = CpuSample {
            at: at + std::time::Duration::from_secs(2),
            process_s: Some(13.0),
            threads: HashMap::from([
                (1, (Role::Load, 1.5)),
                (2, (Role::Shard, 3.25)),
                (3, (Role::IoWorker, 0.75)),
                (4, (Role::KeelOther, 0.1)),
                (5, (Role::IoWorker, 9.0)), // new in the window: not attributed
            ]),
        };
        let u = CpuUse::between(&before, &after);
        assert_eq!(u.wall_s, 2.0);
        assert_eq!(u.process_s, 3.0);
        assert_eq!(u.load_s, 0.5);
        assert_eq!(u.io_workers_s, 0.25);
        assert_eq!(u.keel_s, 1.5);
        assert_eq!(u.keel_s_per_gb(3000.0), Some(0.5));
        assert_eq!(u.keel_s_per_gb(0.0), None);
    }

    #[test]
    fn a_sample_of_this_process_sees_its_own_threads() {
        let before = sample();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_mul(31).wrapping_add(1);
        }
        std::hint::black_box(x);
        let u = CpuUse::between(&before, &sample());
        assert!(u.load_s > 0.0, "{u:?}");
    }
}
