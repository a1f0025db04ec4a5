//! An order-independent digest of a table's rows, to tell whether a rebuilt table holds the same
//! rows as the one it replaces by reading each once, streaming, instead of matching every row of
//! one against the other (`EXCEPT ALL`: a hash table of the whole table, spilled when large).

use std::sync::Arc;

use arrow::array::ArrayRef;
use arrow::datatypes::DataType;
use datafusion::catalog::TableProvider;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::prelude::SessionContext;
use futures::StreamExt;

use crate::error::{Error, Result};

/// Seeds of the two independent row hashes.
const SEEDS: [u64; 2] = [0x243F_6A88_85A3_08D3, 0x1319_8A2E_0370_7344];

/// What a column's hash is when its value is null, before the column's position is mixed in.
const NULL_HASH: u64 = 0x9E37_79B9_7F4A_7C15;

/// The rows of a table as a multiset: their number and, for each of two seeds, the wrapping sum
/// of one hash per row. Tables with the same rows in any order have the same digest; tables
/// whose rows differ have the same one with odds of about 2^-128.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RowsDigest {
    rows: u64,
    sums: [u64; 2],
}

impl RowsDigest {
    fn add(&mut self, other: RowsDigest) {
        self.rows += other.rows;
        for (s, o) in self.sums.iter_mut().zip(other.sums) {
            *s = s.wrapping_add(o);
        }
    }

    /// Add one batch's rows.
    fn add_columns(&mut self, columns: &[ArrayRef], rows: usize) -> Result<()> {
        let mut column_hashes = vec![0u64; rows];
        for (lane, seed) in SEEDS.iter().enumerate() {
            let state = RandomState::with_seed(*seed);
            let mut row_hashes = vec![*seed; rows];
            for (position, column) in columns.iter().enumerate() {
                // Each column is hashed on its own with nulls marked, then folded in by position:
                // a value moving to another column, or a null to another place, changes the row.
                column_hashes.fill(NULL_HASH);
                create_hashes([column], &state, &mut column_hashes)?;
                let position = position as u64;
                for (row, value) in row_hashes.iter_mut().zip(&column_hashes) {
                    *row = mix(row.rotate_left(29) ^ value ^ position);
                }
            }
            self.sums[lane] = row_hashes
                .iter()
                .fold(self.sums[lane], |sum, h| sum.wrapping_add(*h));
        }
        self.rows += rows as u64;
        Ok(())
    }
}

/// A bijective 64-bit mixer (the finaliser of SplitMix64), so that folding columns keeps the
/// row hashes spread.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Whether the digest covers columns of this type: flat types only (nested values are hashed
/// with their nulls folded in ways that could let two different rows agree).
fn digestible(data_type: &DataType) -> bool {
    !data_type.is_nested()
        && !matches!(data_type, DataType::Union(..) | DataType::RunEndEncoded(..))
}

/// The digest of every row of `table`, its partitions read in parallel; `None` when a column
/// is not [`digestible`] (the caller compares such tables otherwise).
pub(crate) async fn rows_digest(
    ctx: &SessionContext,
    table: Arc<dyn TableProvider>,
) -> Result<Option<RowsDigest>> {
    if !table
        .schema()
        .fields()
        .iter()
        .all(|f| digestible(f.data_type()))
    {
        return Ok(None);
    }
    let streams = ctx.read_table(table)?.execute_stream_partitioned().await?;
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|mut stream| {
            tokio::spawn(async move {
                let mut digest = RowsDigest::default();
                while let Some(batch) = stream.next().await {
                    let batch = batch?;
                    digest.add_columns(batch.columns(), batch.num_rows())?;
                }
                Ok::<_, Error>(digest)
            })
        })
        .collect();
    let mut total = RowsDigest::default();
    for task in tasks {
        let part = task
            .await
            .map_err(|e| Error::Internal(format!("digest task: {e}")))??;
        total.add(part);
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};

    fn digest(columns: Vec<ArrayRef>) -> RowsDigest {
        let rows = columns[0].len();
        let mut d = RowsDigest::default();
        d.add_columns(&columns, rows).unwrap();
        d
    }

    fn strings(v: &[Option<&str>]) -> ArrayRef {
        Arc::new(StringArray::from(v.to_vec()))
    }

    #[test]
    fn the_same_rows_in_any_order_or_batches_agree_and_changes_do_not() {
        let ids: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let names = strings(&[Some("a"), None, Some("c")]);
        let whole = digest(vec![ids.clone(), names.clone()]);
        // Reversed and split over two batches.
        let mut split = digest(vec![
            Arc::new(Int64Array::from(vec![3])),
            strings(&[Some("c")]),
        ]);
        split.add(digest(vec![
            Arc::new(Int64Array::from(vec![2, 1])),
            strings(&[None, Some("a")]),
        ]));
        assert_eq!(whole, split);
        // A value changed, a null moved, a row repeated instead of another, columns swapped.
        let changed = [
            digest(vec![ids.clone(), strings(&[Some("a"), None, Some("d")])]),
            digest(vec![ids.clone(), strings(&[None, Some("a"), Some("c")])]),
            digest(vec![
                Arc::new(Int64Array::from(vec![1, 1, 3])),
                strings(&[Some("a"), Some("a"), Some("c")]),
            ]),
        ];
        for other in changed {
            assert_ne!(whole, other);
        }
        // (null, x, null) against (null, null, x).
        let x = strings(&[Some("x")]);
        let null = strings(&[None]);
        assert_ne!(
            digest(vec![null.clone(), x.clone(), null.clone()]),
            digest(vec![null.clone(), null, x])
        );
    }
}
