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

/// The least memory an emulated machine gets, in MiB.
pub const MIN_MACHINE_MIB: u32 = 512;

/// Memory the emulated machine needs for `text`'s VMs, in MiB: what the hypervisor
/// reserves for them (guest RAM, hypervisor-memory budgets, 1 MiB per VM, 8 MiB spare,
/// as its `check_memory` counts) plus room for the firmware, the hypervisor and the
/// fragmentation a large contiguous guest RAM meets, in 256 MiB steps, at least
/// [`MIN_MACHINE_MIB`]. A config that does not parse gets the
/// default (the loader then reports it).
pub fn machine_memory_mib(text: &str) -> u32 {
    let Ok(cfg) = boot_info::config::parse(text) else {
        return MIN_MACHINE_MIB;
    };
    let need: u32 = 8 + cfg
        .vm
        .iter()
        .map(|v| v.memory_mib + v.hv_memory_mib + 1)
        .sum::<u32>();
    // Twice the need leaves a contiguous run for the largest VM's RAM; the rest is
    // OVMF's and the hypervisor's.
    let want = 2 * need + 256;
    want.div_ceil(256).saturating_mul(256).max(MIN_MACHINE_MIB)
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
        let linux = std::fs::read_to_string(root.join("config/demo.toml")).unwrap();
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

    #[test]
    fn the_machine_grows_with_the_vms() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap();
        let read = |f: &str| std::fs::read_to_string(root.join("config").join(f)).unwrap();
        // Four 16 MiB VMs fit the default; the Linux demo (256 MiB + three) needs more.
        assert_eq!(machine_memory_mib(&read("vms.toml")), 512);
        let linux = machine_memory_mib(&read("demo.toml"));
        assert_eq!(
            linux, 1024,
            "2 * (265 + 3 * 25 + 8) + 256, in 256 MiB steps"
        );
        let many: String = (0..32)
            .map(|i| format!("[[vm]]\nname = \"v{i}\"\nmemory_mib = 16\nimage = \"g.elf\"\n"))
            .collect();
        assert_eq!(machine_memory_mib(&many), 2048);
        assert_eq!(machine_memory_mib("not toml"), 512);
    }
}
