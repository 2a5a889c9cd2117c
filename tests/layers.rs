//! The source layout docs/ARCHITECTURE.md describes, checked: src/ holds only main.rs, lib.rs and
//! one folder per layer; every file opens with a comment saying what it holds; each layer imports
//! only from the layers below it; and the map in the doc names exactly the files there are.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Each layer and the layers it may use; the map in docs/ARCHITECTURE.md says why.
const LAYERS: [(&str, &[&str]); 7] = [
    ("cli", &["formats", "cuda", "dist", "cpu", "model", "os"]),
    ("formats", &["cpu", "model", "os"]),
    ("cuda", &["cpu", "model", "os"]),
    ("cpu", &["model"]),
    ("model", &[]),
    ("dist", &["os"]),
    ("os", &[]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn src_holds_only_main_lib_and_the_layer_folders() {
    let mut loose = BTreeSet::new();
    let mut folders = BTreeSet::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            folders.insert(name);
        } else {
            loose.insert(name);
        }
    }
    assert_eq!(loose, BTreeSet::from(["lib.rs".to_string(), "main.rs".to_string()]));
    assert_eq!(folders, LAYERS.iter().map(|(l, _)| l.to_string()).collect());
}

#[test]
fn every_file_opens_with_a_comment_saying_what_it_holds() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    for path in &files {
        let text = std::fs::read_to_string(path).unwrap();
        assert!(text.starts_with("//! "), "{} does not open with a //! comment", path.display());
    }
}

#[test]
fn each_layer_imports_only_from_the_layers_below_it() {
    let mut wrong = Vec::new();
    for (layer, allowed) in LAYERS {
        let mut files = Vec::new();
        rust_files(&src().join(layer), &mut files);
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            for (i, _) in text.match_indices("crate::") {
                let used: String = text[i + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used != layer && !allowed.contains(&used.as_str()) {
                    wrong.push(format!("{} uses crate::{used}", path.strip_prefix(src()).unwrap().display()));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "imports against the layering:\n{}", wrong.join("\n"));
}

#[test]
fn the_architecture_map_matches_the_tree() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/ARCHITECTURE.md")).unwrap();
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut unmapped = Vec::new();
    for path in &files {
        let rel = path.strip_prefix(src()).unwrap().to_string_lossy().into_owned();
        let stem = path.file_stem().unwrap().to_string_lossy();
        // A folder's mod.rs is the folder's row; the reference ops are the `cpu/<op>.rs` row, by name.
        let mapped = doc.contains(&format!("`{rel}`"))
            || doc.contains(&format!("`src/{rel}`"))
            || rel.ends_with("/mod.rs") && doc.contains(&format!("**`src/{}/`**", rel.trim_end_matches("/mod.rs")))
            || rel.starts_with("cpu/") && doc.contains("`cpu/<op>.rs`") && doc.contains(&format!("`{stem}`"));
        if !mapped && rel != "main.rs" && rel != "lib.rs" {
            unmapped.push(rel);
        }
    }
    assert!(unmapped.is_empty(), "files missing from docs/ARCHITECTURE.md's map: {unmapped:?}");
    // And every source file the map names exists.
    for name in doc.split('`').filter(|s| s.ends_with(".rs") && !s.contains(['<', ' ', '$'])) {
        let rel = name.trim_start_matches("src/");
        let exists = src().join(rel).exists() || Path::new(env!("CARGO_MANIFEST_DIR")).join(name).exists();
        assert!(exists, "docs/ARCHITECTURE.md names {name}, which does not exist");
    }
}
