//! Each table of a pack as CSV (header row, RFC 4180 quoting) and as Parquet, for analysts.

use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::pack::PackTable;
use crate::error::Result;

/// The table as CSV.
pub fn csv(t: &PackTable) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    {
        let mut w = arrow::csv::WriterBuilder::new()
            .with_header(true)
            .build(&mut out);
        w.write(&t.batch)?;
    }
    Ok(out)
}

/// The table as a Parquet file.
pub fn parquet(t: &PackTable) -> Result<Vec<u8>> {
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build();
    let mut out = Vec::new();
    let mut w = ArrowWriter::try_new(&mut out, t.batch.schema(), Some(props))?;
    w.write(&t.batch)?;
    w.close()?;
    Ok(out)
}
