//! `BINDINGS` against the kernel signatures: every `#[cube(launch…)]` function of the crate is listed, with the
//! number of its slice parameters (the storage buffers it binds).

use std::collections::BTreeMap;

fn kernels_in(src: &str) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut rest = src;
    while let Some(i) = rest.find("#[cube(launch") {
        rest = &rest[i..];
        let f = rest.find("pub fn ").expect("a kernel function after #[cube(launch…)]");
        let sig = &rest[f + 7..];
        let name: String = sig.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let open = sig.find('(').expect("parameters");
        let close = open + sig[open..].find(") {").or_else(|| sig[open..].find(")\n{")).expect("the end of the parameters");
        let params = &sig[open..close];
        let n = params.matches(": &[").count() + params.matches(": &mut [").count();
        out.push((name, n as u32));
        rest = &sig[close..];
    }
    out
}

#[test]
fn binding_table_matches_the_kernels() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/src");
    let mut found = BTreeMap::new();
    let mut stack = vec![std::path::PathBuf::from(dir)];
    while let Some(p) = stack.pop() {
        for e in std::fs::read_dir(&p).unwrap() {
            let path = e.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "rs") {
                for (name, n) in kernels_in(&std::fs::read_to_string(&path).unwrap()) {
                    found.insert(name, n);
                }
            }
        }
    }
    assert!(found.len() >= 20, "the scan found {} kernels", found.len());
    let table: BTreeMap<String, u32> = kvsqueeze_kernels::BINDINGS.iter().map(|&(n, b)| (n.to_string(), b)).collect();
    assert_eq!(table, found, "kvsqueeze_kernels::BINDINGS (left) against the kernel signatures (right)");
}
