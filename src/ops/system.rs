//! System checks from sysinfo: memory (against the cgroup limit when there is one), CPU, disks.
//! They only ever warn: a busy or full machine should alert people, not pull the sidecar out of
//! the load balancer.

use std::path::{Path, PathBuf};

use chrono::{SecondsFormat, Utc};
use sysinfo::{Disks, System};

use super::health::{CheckEntry, Status};
use crate::config::HealthSettings;

pub struct SystemProbe {
    // `None` where the platform gives no access (the checks then warn "unavailable").
    sys: Option<System>,
    disks: Option<Disks>,
    paths: Vec<PathBuf>,
}

impl SystemProbe {
    pub fn new(settings: &HealthSettings) -> Self {
        let mut sys = System::new().ok();
        // CPU usage is a difference between two refreshes: take the first one now.
        if let Some(sys) = sys.as_mut() {
            sys.refresh_cpu_usage();
        }
        Self {
            sys,
            disks: Disks::new_with_refreshed_list().ok(),
            paths: settings.disk_paths.clone(),
        }
    }

    /// Returns `(check name, entries)` for memory, CPU and disks.
    pub fn check(&mut self, s: &HealthSettings) -> Vec<(&'static str, Vec<CheckEntry>)> {
        let time = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let entry = |id: Option<String>,
                     value: Option<f64>,
                     warn_at: f64,
                     output: Option<String>| CheckEntry {
            component_id: id,
            component_type: "system",
            observed_value: value.map(|v| (v * 10.0).round() / 10.0),
            observed_unit: value.map(|_| "percent"),
            status: match value {
                Some(v) if v <= warn_at => Status::Pass,
                _ => Status::Warn,
            },
            time: time.clone(),
            output,
        };

        let unavailable = |what: &str| Some(format!("{what} unavailable on this platform"));
        let (memory, cpu) = match self.sys.as_mut() {
            Some(sys) => {
                sys.refresh_memory();
                let memory = match sys.cgroup_limits() {
                    Some(c) if c.total_memory > 0 => {
                        let used = c.total_memory.saturating_sub(c.free_memory);
                        entry(
                            Some("cgroup".into()),
                            Some(percent(used, c.total_memory)),
                            s.memory_warn_percent,
                            None,
                        )
                    }
                    _ if sys.total_memory() > 0 => entry(
                        Some("system".into()),
                        Some(percent(sys.used_memory(), sys.total_memory())),
                        s.memory_warn_percent,
                        None,
                    ),
                    _ => entry(
                        None,
                        None,
                        s.memory_warn_percent,
                        unavailable("memory usage"),
                    ),
                };
                sys.refresh_cpu_usage();
                let cpu = entry(
                    None,
                    Some(sys.global_cpu_usage() as f64),
                    s.cpu_warn_percent,
                    None,
                );
                (memory, cpu)
            }
            None => (
                entry(
                    None,
                    None,
                    s.memory_warn_percent,
                    unavailable("memory usage"),
                ),
                entry(None, None, s.cpu_warn_percent, unavailable("CPU usage")),
            ),
        };

        if let Some(d) = self.disks.as_mut() {
            d.refresh(true);
        }
        let disks = self
            .paths
            .iter()
            .map(|p| {
                let id = Some(p.display().to_string());
                match self.disks.as_ref().and_then(|d| disk_usage(d, p)) {
                    Some(v) => entry(id, Some(v), s.disk_warn_percent, None),
                    None => entry(
                        id,
                        None,
                        s.disk_warn_percent,
                        Some("no mounted filesystem found for this path".into()),
                    ),
                }
            })
            .collect();

        vec![
            ("memory:utilization", vec![memory]),
            ("cpu:utilization", vec![cpu]),
            ("disk:utilization", disks),
        ]
    }
}

fn percent(used: u64, total: u64) -> f64 {
    used as f64 * 100.0 / total as f64
}

/// Usage of the filesystem holding `path`: the disk with the longest mount point above it.
fn disk_usage(disks: &Disks, path: &Path) -> Option<f64> {
    let path = path.canonicalize().ok()?;
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()) && d.total_space() > 0)
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| percent(d.total_space() - d.available_space(), d.total_space()))
}
