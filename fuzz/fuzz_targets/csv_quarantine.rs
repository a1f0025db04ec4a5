//! A CSV file of arbitrary bytes read by a source with typed columns: never a panic; every line
//! is either a row or a rejected line with its number and reason, and rows have the declared
//! columns.

#![no_main]

use std::sync::OnceLock;

use kbcrm::plan::{Overrides, Project, Source};
use libfuzzer_sys::fuzz_target;

const PIPELINE: &str = "\
sources:
  s:
    format: csv
    location: data/s.csv
    schema:
      id: { type: bigint, required: true }
      name: string
      amount: \"decimal(10,2)\"
      ratio: double
      day: date
      at: timestamp
      flag: bool
      code: { type: string, required: true }
";

/// The source, loaded once from a project written for it.
fn source() -> &'static Source {
    static SOURCE: OnceLock<Source> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp folder").keep();
        std::fs::create_dir_all(dir.join("pipelines")).expect("pipelines");
        std::fs::create_dir_all(dir.join("data")).expect("data");
        std::fs::write(dir.join("kbcrm.yaml"), "name: fuzz\n").expect("kbcrm.yaml");
        std::fs::write(dir.join("pipelines/p.yaml"), PIPELINE).expect("pipeline");
        std::fs::write(dir.join("data/s.csv"), "id,code\n").expect("data");
        let project = Project::load(&dir, &Overrides::default()).expect("the fuzz project loads");
        project.pipelines[0].sources[0].clone()
    })
}

fuzz_target!(|data: &[u8]| {
    let source = source();
    let schema = kbcrm::sources::convert::declared_schema(&source.columns);
    let Ok(out) = kbcrm::sources::parse_file(source, "s.csv", data, schema.clone()) else {
        // A file-level error (e.g. a header without a required column) is a message, not a row.
        return;
    };
    let rows: usize = out.batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(
        rows as u64 + out.rejects.len() as u64,
        out.rows_read,
        "every line read is a row or a rejected line"
    );
    for b in &out.batches {
        assert_eq!(
            b.schema().fields(),
            schema.fields(),
            "rows have the declared columns"
        );
    }
    for r in &out.rejects {
        assert!(r.line >= 1, "a rejected line has its number: {r:?}");
        assert!(!r.reason.is_empty(), "a rejected line has a reason: {r:?}");
        assert!(
            r.raw.len() <= 4096,
            "the raw text is cut at 4 KiB: {}",
            r.raw.len()
        );
    }
});
