//! `kbcrm init --from`: a pipeline guessed from the user's own files validates and runs
//! unchanged, and the rows it loads are the files' rows.

use crate::support::{Project, stderr, stdout};

/// Files of the shapes real exports have.
fn write_files(p: &Project) {
    // dbgen's shape: '|' after every field, no header.
    p.write(
        "data/orders.tbl",
        "1|36901|O|173665.47|1996-01-02|5-LOW|\n2|78002|O|46929.18|1996-12-01|1-URGENT|\n\
         3|123314|F|193846.25|1993-10-14|5-LOW|\n",
    );
    // A purchase log: runs of blanks, a leading blank, CRLF, ids with leading zeros.
    p.write(
        "data/purchases.txt",
        " 00001   19970101   1   11.77\r\n 00002   19970112   2   12.00\r\n 00002   19970302   5   77.00\r\n",
    );
    // A header with names to map, a byte-order mark, a date format, an empty value.
    p.write(
        "data/customers.csv",
        "\u{feff}Customer ID,Full Name,Signed Up,Active\nC1,Anna Schmidt,01.03.2024,true\n\
         C2,,17.05.2024,false\n",
    );
    // Latin-1 with ';'.
    p.write(
        "exports/kunden/2024.csv",
        b"nr;name\n1;M\xFCller\n2;Gru\xDF\n".as_slice(),
    );
}

#[test]
fn a_pipeline_guessed_from_files_of_every_shape_runs_unchanged() {
    let p = Project::empty();
    write_files(&p);
    let out = p.kbcrm(&[
        "init",
        ".",
        "--from",
        "data/orders.tbl",
        "data/purchases.txt",
        "data/customers.csv",
        "exports/kunden",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(
        stdout(&out).contains("created pipelines/"),
        "{}",
        stdout(&out)
    );
    // What was guessed, and how sure, is said.
    assert!(
        err.contains("delimiter '|': every one of 3 sampled lines has 7 fields"),
        "{err}"
    );
    assert!(err.contains("read as Latin-1"), "{err}");
    let pipeline = std::fs::read_dir(p.path().join("pipelines"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .next()
        .expect("the pipeline file");
    for guess in [
        "csv: { delimiter: \"|\", header: false, trailing_delimiter: true }",
        "csv: { delimiter: whitespace, header: false }",
        "column_2: { type: \"date\", format: \"%Y%m%d\", required: true }",
        "customer_id: { type: \"string\", required: true, source: \"Customer ID\" }",
        "full_name: { type: \"string\", source: \"Full Name\" }",
        "signed_up: { type: \"date\", format: \"%d.%m.%Y\", required: true, source: \"Signed Up\" }",
        "location: \"exports/kunden/\"",
        "encoding: latin1",
    ] {
        assert!(pipeline.contains(guess), "{guess:?} not in:\n{pipeline}");
    }
    p.ok(&["validate"]);
    p.ok(&["run"]);
    assert_eq!(
        p.query("select column_1, column_4, column_5 from stg_orders order by 1"),
        [
            ["1", "173665.47", "1996-01-02"],
            ["2", "46929.18", "1996-12-01"],
            ["3", "193846.25", "1993-10-14"],
        ]
    );
    assert_eq!(
        p.query(
            "select column_1, count(*), sum(column_4) from stg_purchases group by 1 order by 1"
        ),
        [["00001", "1", "11.77"], ["00002", "2", "89.00"]]
    );
    assert_eq!(
        p.query("select customer_id, full_name, signed_up, active from stg_customers order by 1"),
        [
            ["C1", "Anna Schmidt", "2024-03-01", "true"],
            ["C2", "", "2024-05-17", "false"],
        ]
    );
    assert_eq!(
        p.query("select nr, name from stg_kunden order by 1"),
        [["1", "Müller"], ["2", "Gruß"]]
    );
    // A second init --from does not overwrite what the first wrote.
    let again = p.kbcrm(&["init", ".", "--from", "data/orders.tbl"]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
}

#[test]
fn the_demo_sources_load_through_a_guessed_pipeline() {
    let demo = Project::demo();
    let p = Project::empty();
    let from: Vec<String> = [
        "erp/customers",
        "erp/employees/employees.csv",
        "sales/products",
        "sales/channels/channels.csv",
        "service/feedback",
    ]
    .iter()
    .map(|s| demo.path().join("sources").join(s).display().to_string())
    .collect();
    let mut args = vec!["init", ".", "--from"];
    args.extend(from.iter().map(String::as_str));
    let out = p.kbcrm(&args);
    assert!(out.status.success(), "{}", stderr(&out));
    p.ok(&["run"]);
    // Every row of the guessed sources is in their tables: the same counts the demo's own
    // pipelines load, rejects included.
    demo.ok(&["run", "erp", "sales", "service"]);
    for (guessed, declared) in [
        ("stg_customers", "raw_erp_customers"),
        ("stg_products", "raw_sales_products"),
        ("stg_channels", "raw_sales_channels"),
    ] {
        let ours = p.scalar(&format!("select count(*) from {guessed}"));
        let theirs = demo.scalar(&format!("select count(*) from {declared}"));
        let rejected = demo.scalar(&format!(
            "select count(*) from quarantine where source = '{}'",
            declared.rsplit('_').next().unwrap()
        ));
        assert!(
            ours >= theirs && ours <= theirs + rejected,
            "{guessed}: {ours} rows, the demo loads {theirs} and rejects {rejected}"
        );
    }
}
