//! The machine's CPU time from `/proc/stat`, for the benches that say how busy the machine was
//! while they measured: busy (every process, not only the bench's) and stolen by the
//! hypervisor for other guests of a shared VM. On this project's 2-core VMs either can move a
//! latency figure more than the change under test, so a figure comes with both.

/// The machine's CPU time since boot, in clock ticks (the first line of `/proc/stat`).
#[derive(Clone, Copy, Debug)]
pub struct CpuTicks {
    /// user, nice, system, idle, iowait, irq, softirq and steal (guest time is in user).
    pub all: u64,
    /// All but idle and iowait.
    pub busy: u64,
    /// Given by the hypervisor to other guests.
    pub steal: u64,
}

impl CpuTicks {
    /// Now; `None` where `/proc/stat` cannot be read or has no `cpu` line of numbers.
    pub fn now() -> Option<CpuTicks> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        let all = fields.iter().take(8).sum();
        let idle = fields.get(3)? + fields.get(4)?;
        Some(CpuTicks {
            all,
            busy: all - idle,
            steal: *fields.get(7)?,
        })
    }

    /// The share of the CPU time since `before` that was busy (`None`: none elapsed).
    pub fn busy_since(&self, before: &CpuTicks) -> Option<f64> {
        self.share_since(before, |ticks| ticks.busy)
    }

    /// The share of the CPU time since `before` that the hypervisor stole (`None`: none
    /// elapsed).
    pub fn stolen_since(&self, before: &CpuTicks) -> Option<f64> {
        self.share_since(before, |ticks| ticks.steal)
    }

    fn share_since(&self, before: &CpuTicks, part: impl Fn(&CpuTicks) -> u64) -> Option<f64> {
        let all = self.all.checked_sub(before.all).filter(|&all| all > 0)?;
        Some(part(self).saturating_sub(part(before)) as f64 / all as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_ticks_between_two_readings() {
        let before = CpuTicks::now().expect("/proc/stat on Linux");
        assert!(before.busy <= before.all && before.steal <= before.busy);
        let after = CpuTicks {
            all: before.all + 200,
            busy: before.busy + 50,
            steal: before.steal + 10,
        };
        assert_eq!(after.busy_since(&before), Some(0.25));
        assert_eq!(after.stolen_since(&before), Some(0.05));
        assert_eq!(before.busy_since(&before), None, "no time elapsed");
    }
}
