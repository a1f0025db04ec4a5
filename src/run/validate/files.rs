//! The first rows of every CSV and JSON source read as a load would read them, before any run:
//! a header, delimiter or field count that cannot match the files is found by `kbcrm validate`.

use object_store::ObjectStoreExt;

use crate::error::{Error, Problem, Result};
use crate::plan::{Delimiter, FileFormat, Input, Pipeline, Project, Source};
use crate::sources::{self, FileOutput};
use crate::storage::store_for;

/// Bytes read from the start of each source's first file.
const SAMPLE_BYTES: u64 = 64 * 1024;

/// Read the start of the first file of each CSV and JSON source (at most 64 KiB, cut
/// at its last whole line) as a load does, and fail with every source whose header does not
/// match or none of whose sampled rows loads: the file, line and reason, and the likely fix. A
/// source with no file yet is passed over.
pub async fn check_source_files(project: &Project) -> Result<()> {
    let mut problems = Vec::new();
    for p in &project.pipelines {
        for s in &p.sources {
            if let Some(problem) = check_source(p, s).await? {
                problems.push(problem);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Invalid(problems))
    }
}

/// The problem with one source's first file, if any.
async fn check_source(pipeline: &Pipeline, source: &Source) -> Result<Option<Problem>> {
    let Input::Files {
        format: format @ (FileFormat::Csv(_) | FileFormat::Json),
        location,
    } = &source.input
    else {
        return Ok(None);
    };
    let problem = |message: String| Some(Problem::new(&pipeline.file, message));
    let store = store_for(&location.store_url)?;
    // Files may arrive only before the run (a project validated in CI): none is no problem here.
    let Ok(listing) = sources::list_files(source, location, &store).await else {
        return Ok(None);
    };
    let Some(first) = listing.files.first() else {
        return Ok(None);
    };
    let end = first.size.min(SAMPLE_BYTES);
    let bytes = store.get_range(&first.path, 0..end).await?;
    // A cut file ends at its last whole line.
    let whole = match end < first.size {
        true => bytes
            .iter()
            .rposition(|b| *b == b'\n')
            .map_or(&bytes[..0], |i| &bytes[..=i]),
        false => &bytes[..],
    };
    let schema = sources::table_schema(source);
    let out = match sources::parse_file(source, &first.display, whole, schema) {
        Ok(out) => out,
        Err(e @ Error::Source { .. }) => return Ok(problem(e.to_string())),
        Err(e) => return Err(e),
    };
    Ok(none_loads(source, format, &out).and_then(problem))
}

/// When not one sampled row loads: the first row's file, line and reason, and the likely fix.
fn none_loads(source: &Source, format: &FileFormat, out: &FileOutput) -> Option<String> {
    let first = out.rejects.first()?;
    if out.rows_read == 0 || out.rejects.len() as u64 != out.rows_read {
        return None;
    }
    let fix = match format {
        FileFormat::Csv(opts) => {
            let fields = match opts.delimiter {
                Delimiter::Byte(d) => first.raw.split(char::from(d)).count(),
                Delimiter::Whitespace => first.raw.split_whitespace().count(),
            };
            sources::delimiter_hint(opts, fields, &first.raw)
        }
        _ => None,
    }
    .map_or(String::new(), |fix| format!("; {fix}"));
    Some(format!(
        "source '{}': none of the first {} rows of {} loads; the first, at line {}: {}{fix}",
        source.name, out.rows_read, first.file, first.line, first.reason
    ))
}
