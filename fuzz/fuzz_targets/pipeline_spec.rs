//! A pipeline file of arbitrary text: loading the project never panics, and a rejected file
//! renders as the CLI shows it (miette, with source spans) without panicking either.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

/// A project folder with a kbcrm.yaml and one model; each input becomes its pipeline file.
fn project() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp folder").keep();
        std::fs::create_dir_all(dir.join("pipelines")).expect("pipelines");
        std::fs::create_dir_all(dir.join("sql")).expect("sql");
        std::fs::create_dir_all(dir.join("data")).expect("data");
        std::fs::write(
            dir.join("kbcrm.yaml"),
            "name: fuzz\nwarehouse: warehouse/\n",
        )
        .expect("kbcrm.yaml");
        std::fs::write(dir.join("sql/m.sql"), "select * from raw_p_s\n").expect("model");
        std::fs::write(dir.join("data/s.csv"), "a,b\n1,x\n").expect("data");
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = project();
    std::fs::write(dir.join("pipelines/p.yaml"), text).expect("pipeline file");
    if let Err(e) = kbcrm::plan::Project::load(dir, &kbcrm::plan::Overrides::default()) {
        let shown = format!("{:?}", miette::Report::new(e));
        assert!(!shown.trim().is_empty(), "an error without a message");
    }
});
