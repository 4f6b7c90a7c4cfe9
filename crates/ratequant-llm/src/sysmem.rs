//! What the operating system says about memory (Linux `/proc`), for refusing runs that cannot
//! fit before allocating and for reporting peak use. `None` wherever it cannot be read.

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn available_memory() -> Option<u64> {
    proc_kib_field("/proc/meminfo", "MemAvailable:")
}

/// Peak resident set size of this process (`VmHWM` of `/proc/self/status`), in bytes.
pub fn peak_resident_memory() -> Option<u64> {
    proc_kib_field("/proc/self/status", "VmHWM:")
}

/// A `Name:   1234 kB` line of a /proc file, in bytes.
fn proc_kib_field(file: &str, name: &str) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let line = text.lines().find(|l| l.starts_with(name))?;
    let kib: u64 = line[name.len()..].split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_fields_parse() {
        // On Linux both exist; elsewhere the functions say "unknown" instead of failing.
        if std::path::Path::new("/proc/meminfo").exists() {
            assert!(available_memory().unwrap() > 0);
            assert!(peak_resident_memory().unwrap() > 0);
        }
    }
}
