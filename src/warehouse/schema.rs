//! Arrow schemas as Delta can store them.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;

use crate::config::types::UTC;
use crate::error::Result;

/// The type Delta stores for `t`: views and large types become their plain forms, timestamps
/// become UTC microseconds, unsigned integers widen, dictionaries unpack, NULL becomes text.
fn delta_type(t: &DataType) -> DataType {
    match t {
        DataType::Utf8View | DataType::LargeUtf8 | DataType::Null => DataType::Utf8,
        DataType::BinaryView | DataType::LargeBinary | DataType::FixedSizeBinary(_) => {
            DataType::Binary
        }
        DataType::Timestamp(_, _) => {
            DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC)))
        }
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        DataType::Float16 => DataType::Float32,
        DataType::Decimal32(p, s) | DataType::Decimal64(p, s) => DataType::Decimal128(*p, *s),
        DataType::Decimal256(p, s) if *p <= 38 => DataType::Decimal128(*p, *s),
        DataType::Dictionary(_, v) => delta_type(v),
        DataType::Date64 => DataType::Date32,
        DataType::List(f)
        | DataType::LargeList(f)
        | DataType::ListView(f)
        | DataType::LargeListView(f) => DataType::List(Arc::new(delta_field(f))),
        DataType::Struct(fields) => {
            DataType::Struct(fields.iter().map(|f| delta_field(f)).collect())
        }
        other => other.clone(),
    }
}

fn delta_field(f: &Field) -> Field {
    Field::new(
        f.name(),
        delta_type(f.data_type()),
        f.is_nullable() || f.data_type() == &DataType::Null,
    )
}

/// The schema Delta stores for `schema`.
pub fn delta_compatible(schema: &Schema) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| delta_field(f))
            .collect::<Vec<_>>(),
    ))
}

/// Cast `batch` to `target` (a schema from [`delta_compatible`]), column by column.
pub fn conform_batch(batch: &RecordBatch, target: &SchemaRef) -> Result<RecordBatch> {
    if batch.schema().fields() == target.fields() {
        return Ok(batch.clone());
    }
    let columns = batch
        .columns()
        .iter()
        .zip(target.fields())
        .map(|(a, f)| {
            if a.data_type() == f.data_type() {
                Ok(a.clone())
            } else {
                arrow::compute::cast(a, f.data_type())
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(target.clone(), columns)?)
}

/// Cast a batch to its Delta-compatible form (plain strings instead of views, and so on).
pub fn delta_compatible_batch(batch: &RecordBatch) -> Result<RecordBatch> {
    conform_batch(batch, &delta_compatible(&batch.schema()))
}

/// Whether two table schemas hold the same columns with the same types (nullability aside).
pub fn same_columns(a: &Schema, b: &Schema) -> bool {
    a.fields().len() == b.fields().len()
        && a.fields()
            .iter()
            .zip(b.fields())
            .all(|(x, y)| x.name() == y.name() && x.data_type() == y.data_type())
}
