//! The VM configuration (`hv/vms.toml`) checked on the host with the loader's own
//! parser (`boot_info::config`), so a bad config is reported before anything is
//! built or booted.

use crate::Result;

/// Parses `text` as the loader will; a one-line summary, or the loader's message.
pub fn check(text: &str) -> Result<String> {
    let cfg = boot_info::config::parse(text).map_err(|e| format!("config error: vms.toml: {e}"))?;
    let names: Vec<&str> = cfg.vm.iter().map(|v| v.name.as_str()).collect();
    Ok(format!(
        "{} VM(s) [{}], GPU quantum {} ms, scheduler {:?}",
        cfg.vm.len(),
        names.join(", "),
        cfg.scheduler.quantum_ms,
        cfg.scheduler.mode
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_config_passes_and_a_bad_one_is_named() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap();
        let demo = std::fs::read_to_string(root.join("config/vms.toml")).unwrap();
        let s = check(&demo).unwrap();
        assert!(s.contains("VM(s)"), "{s}");
        let linux = std::fs::read_to_string(root.join("config/linux-demo.toml")).unwrap();
        let s = check(&linux).unwrap();
        assert!(s.starts_with("4 VM(s) [linux, vm1, vm2, vm3]"), "{s}");
        let e = check("[[vm]]\nname = \"a\"\nmemory_mib = 1\nimage = \"x.elf\"\n").unwrap_err();
        assert!(
            e.starts_with("config error: vms.toml:") && e.contains("memory_mib"),
            "{e}"
        );
        let e = check("[[vm]]\nname = \"a\"\nmemory_mb = 16\n").unwrap_err();
        assert!(e.contains("config error"), "{e}");
    }
}
