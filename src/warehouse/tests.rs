use super::*;
use arrow::array::Int64Array;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;

fn write_file(path: &std::path::Path, values: &[i64]) -> SchemaRef {
    let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![Arc::new(Int64Array::from(values.to_vec()))],
    )
    .expect("batch");
    let file = std::fs::File::create(path).expect("create");
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    schema
}

/// The values of column `n` a query over `table` in `ctx` returns, in order.
async fn values(ctx: &SessionContext, sql: &str) -> Vec<i64> {
    let batches = ctx
        .sql(sql)
        .await
        .expect("plan")
        .collect()
        .await
        .expect("run");
    batches
        .iter()
        .flat_map(|b| {
            let col = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Int64)
                .expect("cast");
            col.as_any()
                .downcast_ref::<Int64Array>()
                .expect("ints")
                .values()
                .to_vec()
        })
        .collect()
}

#[test]
fn rows_a_deletion_vector_removes_are_not_read_and_a_cluster_listing_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let table = dir.path().join("t");
    std::fs::create_dir_all(table.join("_delta_log")).expect("log folder");
    let numbers: Vec<i64> = (0..10).collect();
    write_file(&table.join("a.parquet"), &numbers);
    let size = std::fs::metadata(table.join("a.parquet"))
        .expect("size")
        .len();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
            let root = Url::from_directory_path(dir.path()).expect("url");
            let wh = Warehouse::open(&root).expect("warehouse");
            let table_url = wh.table_url("t");
            // Rows 1, 2 and 7 deleted, as a Delta writer's merge leaves them: a deletion
            // vector file beside the data, named by the add action.
            let deleted = deletion::Deleted::new(vec![7, 1, 2], 10).expect("deleted");
            let descriptors =
                deletion::write_deletion_vectors(wh.store(), &table_url, &[&deleted])
                    .await
                    .expect("written");
            let dv = serde_json::to_string(&descriptors[0]).expect("json");
            let log = [
                r#"{"protocol":{"minReaderVersion":3,"minWriterVersion":7,"readerFeatures":["deletionVectors"],"writerFeatures":["deletionVectors"]}}"#.to_string(),
                r#"{"metaData":{"id":"00000000-0000-0000-0000-000000000001","format":{"provider":"parquet","options":{}},"schemaString":"{\"type\":\"struct\",\"fields\":[{\"name\":\"n\",\"type\":\"long\",\"nullable\":false,\"metadata\":{}}]}","partitionColumns":[],"configuration":{"delta.enableDeletionVectors":"true"},"createdTime":1700000000000}}"#.to_string(),
                format!(
                    r#"{{"add":{{"path":"a.parquet","partitionValues":{{}},"size":{size},"modificationTime":1700000000000,"dataChange":true,"stats":"{{\"numRecords\":10}}","deletionVector":{dv}}}}}"#
                ),
            ];
            std::fs::write(
                table.join("_delta_log/00000000000000000000.json"),
                log.join("\n") + "\n",
            )
            .expect("log");

            let files = wh.files_at("t", None).await.expect("files");
            assert_eq!(files.len(), 1);
            let d = files[0].deleted.as_ref().expect("deleted rows");
            assert_eq!((d.rows(), d.file_rows()), (&[1, 2, 7][..], 10));

            let kept = vec![0, 3, 4, 5, 6, 8, 9];
            // The snapshots the server and extracts read, and the Delta provider of queries.
            let ctx = SessionContext::new();
            wh.register_snapshots(&ctx).await.expect("snapshots");
            assert_eq!(values(&ctx, "select n from t order by n").await, kept);
            // Counted by reading, not from the file's row count.
            assert_eq!(values(&ctx, "select count(*) from t").await, vec![7]);
            assert_eq!(values(&ctx, "select n from t order by n limit 2").await, vec![0, 3]);
            assert_eq!(values(&ctx, "select n from t where n > 5 order by n").await, vec![6, 8, 9]);
            let all = SessionContext::new();
            wh.register_all(&all).await.expect("register all");
            assert_eq!(values(&all, "select n from t order by n").await, kept);
            // Delta's own reader agrees on the vector kbcrm wrote.
            let delta = SessionContext::new();
            let t = wh.load("t").await.expect("load").expect("table");
            t.update_datafusion_session(&delta.state()).expect("session");
            let provider = t.table_provider().await.expect("provider");
            delta.register_table("t", provider).expect("register");
            assert_eq!(values(&delta, "select n from t order by n").await, kept);
            let info = wh.info("t").await.expect("info").expect("table");
            assert_eq!(info.rows, 7);

            let cluster = SessionContext::new();
            let err = wh.register_for_cluster(&cluster).await.expect_err("refused");
            let text = err.to_string();
            assert!(
                text.contains("table 't'") && text.contains("deletion vector"),
                "{text}"
            );
        });
}

#[test]
fn a_removed_file_fails_the_scan_instead_of_reading_as_empty() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = dir.path().join("a.parquet");
    let b = dir.path().join("b.parquet");
    let schema = write_file(&a, &[1, 2, 3]);
    write_file(&b, &[4, 5]);
    let urls: Vec<Url> = [&a, &b]
        .iter()
        .map(|p| Url::from_file_path(p).expect("url"))
        .collect();
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let ctx = SessionContext::new();
        let provider = files_provider(&urls, schema).await.expect("provider");
        ctx.register_table("t", provider).expect("register");
        let count = |ctx: SessionContext| async move {
            let batches = ctx.sql("select sum(n) from t").await?.collect().await?;
            datafusion::error::Result::Ok(
                arrow::util::pretty::pretty_format_batches(&batches)?.to_string(),
            )
        };
        let before = count(ctx.clone()).await.expect("both files");
        assert!(before.contains("15"), "{before}");
        std::fs::remove_file(&b).expect("remove");
        let text = match count(ctx.clone()).await {
            Ok(rows) => panic!("a missing file must fail the scan, read {rows}"),
            Err(e) => datafusion::error::DataFusionError::to_string(&e),
        };
        assert!(
            text.contains("b.parquet") && text.contains("is missing"),
            "{text}"
        );
    });
}
