//! What the benchmarks share: a throwaway copy of the repository's project.

use std::path::{Path, PathBuf};

/// Copy a folder and everything in it.
pub fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            copy_tree(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).expect("copy");
        }
    }
}

/// A fresh folder in the temporary directory holding the repository's kbcrm.yaml, pipelines and
/// SQL (no warehouse, no sources).
pub fn project_dir(name: &str) -> PathBuf {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    copy_tree(&repo.join("pipelines"), &dir.join("pipelines"));
    copy_tree(&repo.join("sql"), &dir.join("sql"));
    std::fs::copy(repo.join("kbcrm.yaml"), dir.join("kbcrm.yaml")).expect("copy kbcrm.yaml");
    dir
}
