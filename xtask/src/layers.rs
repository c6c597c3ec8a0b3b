//! The layering rule, checked on the source: no import circles between the modules
//! of a crate (the kernel, `gpu-pv`, `vdev`, xtask itself). A module that uses
//! another through `crate::` depends on it; a circle means two modules cannot be
//! understood, tested or moved apart, so `cargo test` fails on one.
//!
//! A module is a top-level file (`vm.rs`) or a top-level folder (`gpu/`), whose
//! files count together, except in the folders listed as split, where each file is a
//! module of its own (`arch/idt.rs` is the interrupt entry, far above
//! `arch/cpu.rs`). Comments and inline `mod tests` blocks are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module -> the modules it uses.
pub type Graph = BTreeMap<String, BTreeSet<String>>;

/// The module a file belongs to (`None` for the crate root).
fn module_of(rel: &str, split: &[&str]) -> Option<String> {
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    let node = match parts.as_slice() {
        [top] => top.to_string(),
        [dir, file, ..] if split.contains(dir) => format!("{dir}::{file}"),
        [dir, ..] => dir.to_string(),
        [] => return None,
    };
    (node != "main" && node != "lib").then_some(node)
}

/// The module dependency graph of the crate whose sources are under `src`.
pub fn graph(src: &Path, split: &[&str]) -> std::io::Result<Graph> {
    let mut files = Vec::new();
    collect(src, src, &mut files)?;
    let mut g: Graph = files
        .iter()
        .filter_map(|(rel, _)| module_of(rel, split))
        .map(|n| (n, BTreeSet::new()))
        .collect();
    for (rel, text) in &files {
        let Some(node) = module_of(rel, split) else {
            continue;
        };
        for used in uses(text) {
            let target = match used.as_slice() {
                [dir, sub, ..] if split.contains(&dir.as_str()) => {
                    let sub = format!("{dir}::{sub}");
                    if g.contains_key(&sub) {
                        sub
                    } else {
                        format!("{dir}::mod")
                    }
                }
                [top, ..] => top.clone(),
                [] => continue,
            };
            if target != node && g.contains_key(&target) {
                if let Some(deps) = g.get_mut(&node) {
                    deps.insert(target);
                }
            }
        }
    }
    Ok(g)
}

fn collect(root: &Path, dir: &Path, out: &mut Vec<(String, String)>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            collect(root, &path, out)?;
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .to_string_lossy()
                .replace('\\', "/");
            out.push((rel, std::fs::read_to_string(&path)?));
        }
    }
    Ok(())
}

/// The `crate::a::b` paths `text` uses (first two segments), outside comments and
/// inline test modules.
fn uses(text: &str) -> Vec<Vec<String>> {
    let code = text
        .split("#[cfg(test)]\nmod tests {")
        .next()
        .unwrap_or(text);
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        let mut rest = line;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            let segs: Vec<String> = rest
                .split("::")
                .take(2)
                .map(|s| {
                    s.chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|s| !s.is_empty())
                .collect();
            if !segs.is_empty() {
                out.push(segs);
            }
        }
    }
    out
}

/// The circles of `g` (strongly connected sets of more than one module), each
/// sorted.
pub fn circles(g: &Graph) -> Vec<Vec<String>> {
    // Tarjan's algorithm; graphs here have a few dozen nodes.
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on.insert(v);
        let g = s.g;
        for w in g.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask is in the workspace")
            .to_path_buf()
    }

    /// The crates whose modules must not form circles, and their split folders.
    const CRATES: &[(&str, &[&str])] = &[
        ("hypervisor/src", &["arch", "mm", "virt", "gpu", "iommu"]),
        ("gpu-pv/src", &[]),
        ("vdev/src", &[]),
        ("xtask/src", &[]),
    ];

    #[test]
    fn no_crate_has_import_circles() {
        for (src, split) in CRATES {
            let g = graph(&repo().join(src), split).expect("the sources read");
            assert!(g.len() >= 5, "{src}: {} modules found", g.len());
            assert_eq!(
                circles(&g),
                Vec::<Vec<String>>::new(),
                "{src}: import circles"
            );
        }
    }

    #[test]
    fn a_circle_is_found_and_comments_are_not_uses() {
        let dir = std::env::temp_dir().join(format!("xtask-layers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("arch")).unwrap();
        std::fs::write(dir.join("a.rs"), "fn f() { crate::b::g() }\n").unwrap();
        std::fs::write(dir.join("b.rs"), "fn g() { crate::arch::cpu::h() }\n").unwrap();
        std::fs::write(dir.join("c.rs"), "// crate::a::f\nfn k() {}\n").unwrap();
        std::fs::write(dir.join("arch/cpu.rs"), "fn h() { crate::a::f() }\n").unwrap();
        std::fs::write(dir.join("arch/idt.rs"), "fn i() { crate::c::k() }\n").unwrap();
        let g = graph(&dir, &["arch"]).unwrap();
        assert_eq!(circles(&g), vec![vec!["a", "arch::cpu", "b"]]);
        assert!(g["c"].is_empty(), "a comment is not a use");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
