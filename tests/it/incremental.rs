//! Load modes on small hand-written data: SCD type 2, cursors, loaded files, full refresh.

use crate::support::Project;

fn rows(v: &[&[&str]]) -> Vec<Vec<String>> {
    v.iter()
        .map(|r| r.iter().map(|s| s.to_string()).collect())
        .collect()
}

const SCD_PIPELINE: &str = "\
sources:
  people:
    format: csv
    location: data/people.csv
    schema:
      id: { type: int, required: true }
      city: string
      phone: string
      changed_on: date
models:
  - path: sql/dim_person.sql
    mode: scd2
    keys: [id]
    scd2: { tracked: [city], valid_from: changed_on, surrogate_key: person_key }
";

#[test]
fn scd2_versions_tracked_changes_and_updates_others_in_place() {
    let p = Project::empty();
    p.write("pipelines/p.yaml", SCD_PIPELINE);
    p.write(
        "sql/dim_person.sql",
        "select id, city, phone, changed_on from raw_p_people\n",
    );
    p.write("data/people.csv", "id,city,phone,changed_on\n1,Berlin,111,2024-01-01\n2,Köln,222,2024-01-01\n3,Ulm,333,2024-01-01\n");
    p.ok(&["run"]);
    let q = "select person_key, id, city, phone, cast(valid_from as date), cast(valid_to as date), is_current from dim_person order by person_key";
    assert_eq!(
        p.query(q),
        rows(&[
            &[
                "1",
                "1",
                "Berlin",
                "111",
                "1900-01-01",
                "2199-12-31",
                "true"
            ],
            &["2", "2", "Köln", "222", "1900-01-01", "2199-12-31", "true"],
            &["3", "3", "Ulm", "333", "1900-01-01", "2199-12-31", "true"],
        ])
    );
    // 1 moves (tracked), 2 changes phone (in place), 3 unchanged, 4 is new.
    p.write(
        "data/people.csv",
        "id,city,phone,changed_on\n1,Hamburg,111,2024-06-01\n2,Köln,999,2024-06-01\n3,Ulm,333,2024-01-01\n4,Jena,444,2024-06-01\n",
    );
    p.ok(&["run"]);
    assert_eq!(
        p.query(q),
        rows(&[
            &[
                "1",
                "1",
                "Berlin",
                "111",
                "1900-01-01",
                "2024-06-01",
                "false"
            ],
            &["2", "2", "Köln", "999", "1900-01-01", "2199-12-31", "true"],
            &["3", "3", "Ulm", "333", "1900-01-01", "2199-12-31", "true"],
            &[
                "4",
                "1",
                "Hamburg",
                "111",
                "2024-06-01",
                "2199-12-31",
                "true"
            ],
            &["5", "4", "Jena", "444", "1900-01-01", "2199-12-31", "true"],
        ])
    );
    // Nothing changed: nothing written.
    let before = p.ok(&["tables"]);
    p.ok(&["run"]);
    assert_eq!(before, p.ok(&["tables"]));
}

/// The rows a model read, from its line of a run's summary.
fn rows_read(out: &str, model: &str) -> String {
    out.lines()
        .find(|l| l.trim_start().starts_with("model") && l.contains(model))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_else(|| panic!("no line for {model}: {out}"))
        .to_string()
}

/// An scd2 model refreshed from a merged table (`incremental:`) reads only the rows the merge
/// added or changed, not the unchanged rows of the files it rewrote, and ends with the versions
/// a whole comparison gives.
#[test]
fn an_incremental_scd2_model_reads_only_the_rows_a_merge_changed() {
    let p = Project::empty();
    let pipeline = "sources:\n  people:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    \
             incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      city: string\n      \
             phone: string\n      changed_on: date\n\
             models:\n  - path: sql/dim_person.sql\n    mode: scd2\n    keys: [id]\n    \
             scd2: { tracked: [city], valid_from: changed_on, surrogate_key: person_key }\n    \
             incremental: raw_p_people\n";
    p.write("pipelines/p.yaml", pipeline);
    p.write(
        "sql/dim_person.sql",
        "select id, city, phone, changed_on from raw_p_people\n",
    );
    p.write(
        "data/people_1.csv",
        "id,city,phone,changed_on\n1,Berlin,111,2024-01-01\n2,Köln,222,2024-01-01\n3,Ulm,333,2024-01-01\n5,Bonn,555,2024-01-01\n",
    );
    p.ok(&["run"]);
    // 1 moves (tracked), 2 changes phone (in place), 3 comes again unchanged, 4 is new; 5 is not
    // in the file. The merge rewrites people_1's rows: 3 and 5 go to a file of rows kept as they
    // were, which the model skips.
    p.write(
        "data/people_2.csv",
        "id,city,phone,changed_on\n1,Hamburg,111,2024-06-01\n2,Köln,999,2024-06-01\n3,Ulm,333,2024-01-01\n4,Jena,444,2024-06-01\n",
    );
    assert_eq!(
        rows_read(&p.ok(&["run"]), "dim_person"),
        "3",
        "the model should read the 3 rows added or changed"
    );
    let log: String = std::fs::read_dir(p.path().join("warehouse/raw_p_people/_delta_log"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    assert!(log.contains("\"kbcrm.rowsUnchangedSince\":\"0\""), "{log}");
    let q = "select person_key, id, city, phone, cast(valid_from as date), cast(valid_to as date), is_current from dim_person order by person_key";
    assert_eq!(
        p.query(q),
        rows(&[
            &[
                "1",
                "1",
                "Berlin",
                "111",
                "1900-01-01",
                "2024-06-01",
                "false"
            ],
            &["2", "2", "Köln", "999", "1900-01-01", "2199-12-31", "true"],
            &["3", "3", "Ulm", "333", "1900-01-01", "2199-12-31", "true"],
            &["4", "5", "Bonn", "555", "1900-01-01", "2199-12-31", "true"],
            &[
                "5",
                "1",
                "Hamburg",
                "111",
                "2024-06-01",
                "2199-12-31",
                "true"
            ],
            &["6", "4", "Jena", "444", "1900-01-01", "2199-12-31", "true"],
        ])
    );
    // A third file changes 5, whose row sat in the kept file: it is read, and nothing else.
    p.write(
        "data/people_3.csv",
        "id,city,phone,changed_on\n5,Bonn,556,2024-07-01\n",
    );
    assert_eq!(rows_read(&p.ok(&["run"]), "dim_person"), "1");
    assert_eq!(
        p.query("select phone from dim_person where id = 5 and is_current"),
        [["556"]]
    );
    assert_eq!(p.scalar("select count(*) from dim_person"), 6);

    // Other modes cannot be refreshed from what changed.
    p.write(
        "pipelines/p.yaml",
        pipeline.split("    mode: scd2").next().unwrap().to_string()
            + "    incremental: raw_p_people\n",
    );
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    let err = crate::support::stderr(&out);
    assert!(
        err.contains("`incremental:` needs `mode: merge` or `mode: scd2`"),
        "{err}"
    );
}

#[test]
fn cursor_loads_rows_above_the_watermark_and_full_refresh_reloads() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  e:\n    format: csv\n    location: data/events.csv\n    mode: append\n    incremental: { cursor: seq }\n    schema:\n      seq: { type: bigint, required: true }\n      what: string\n",
    );
    p.write("data/events.csv", "seq,what\n1,a\n2,b\n10,c\n");
    p.ok(&["run"]);
    assert_eq!(p.scalar("select count(*) from raw_p_e"), 3);
    assert_eq!(
        p.query("select value from kbcrm_state where key = 'cursor'"),
        rows(&[&["10"]])
    );
    // The export grows; old rows are still in it.
    p.write(
        "data/events.csv",
        "seq,what\n1,a\n2,b\n10,c\n9,late\n11,d\n12,e\n",
    );
    let out = p.ok(&["run"]);
    assert!(out.contains("raw_p_e"), "{out}");
    assert_eq!(
        p.query("select seq from raw_p_e order by seq"),
        rows(&[&["1"], &["2"], &["10"], &["11"], &["12"]])
    );
    assert_eq!(
        p.query("select value from kbcrm_state where key = 'cursor'"),
        rows(&[&["12"]])
    );
    // A full refresh reloads everything, late row included.
    p.ok(&["run", "--full-refresh"]);
    assert_eq!(p.scalar("select count(*) from raw_p_e"), 6);
}

#[test]
fn new_files_are_loaded_once_even_after_a_failed_run() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  e:\n    format: csv\n    location: data/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\ntests:\n  - sql: { name: no negative ids, query: \"select * from raw_p_e where id < 0\" }\n",
    );
    p.write("data/a.csv", "id\n1\n2\n");
    p.ok(&["run"]);
    // A batch that fails its data test commits nothing, not even the record of its file.
    p.write("data/b.csv", "id\n3\n-4\n");
    let out = p.kbcrm(&["run"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(p.scalar("select count(*) from raw_p_e"), 2);
    assert_eq!(p.scalar("select count(*) from kbcrm_loaded_files"), 1);
    // Fixed at the source and re-run: the batch lands exactly once.
    p.write("data/b.csv", "id\n3\n4\n");
    let out = p.ok(&["run"]);
    assert!(out.contains(" 2 read"), "{out}");
    assert_eq!(
        p.query("select id from raw_p_e order by id"),
        rows(&[&["1"], &["2"], &["3"], &["4"]])
    );
    let out = p.ok(&["run"]);
    assert!(out.contains("(no new files)"), "{out}");
    assert_eq!(p.scalar("select count(*) from raw_p_e"), 4);
}

#[test]
fn a_moved_project_does_not_load_its_files_again() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  e:\n    format: csv\n    location: data/\n    mode: append\n    incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n",
    );
    p.write("data/a.csv", "id\n1\n2\n");
    p.ok(&["run"]);
    assert_eq!(
        p.query("select file from kbcrm_loaded_files"),
        rows(&[&["data/a.csv"]])
    );
    // The same project in another folder: the appended rows are not loaded a second time.
    let moved = p.copied();
    drop(p);
    let out = moved.ok(&["run"]);
    assert!(out.contains("(no new files)"), "{out}");
    moved.write("data/b.csv", "id\n3\n");
    let out = moved.ok(&["run"]);
    assert!(out.contains(" 1 read"), "{out}");
    assert_eq!(
        moved.query("select id from raw_p_e order by id"),
        rows(&[&["1"], &["2"], &["3"]])
    );
}

#[test]
fn rejects_command_lists_and_summarises_quarantine() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  e:\n    format: csv\n    location: data/\n    rejects: { max_ratio: 0.9 }\n    schema:\n      id: { type: int, required: true }\n      amount: \"decimal(6,2)\"\n",
    );
    p.write("data/a.csv", "id,amount\n1,1.00\nx,2.00\n3,abc\n4,xyz\n");
    p.ok(&["run"]);
    let list = p.ok(&["rejects", "--format", "csv"]);
    assert_eq!(list.lines().count(), 4, "{list}");
    assert!(
        list.contains("a.csv,3,id,'x' is not a valid int for column 'id'"),
        "{list}"
    );
    let summary = p.ok(&["rejects", "--summary", "--format", "csv"]);
    assert!(
        summary
            .contains("p,e,amount,\"<value> is not a valid decimal(6,2) for column 'amount'\",2"),
        "{summary}"
    );
    assert!(
        summary.contains("p,e,id,<value> is not a valid int for column 'id',1"),
        "{summary}"
    );
}

/// The data files of a table (names), sorted.
fn data_files(p: &Project, table: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(p.path().join("warehouse").join(table))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".parquet") || n.ends_with(".bin"))
        .collect();
    names.sort();
    names
}

/// A merge that replaces a few rows of a file marks them deleted (a deletion vector) instead of
/// rewriting the file; queries, the run's own later steps and the table list all leave them
/// out; a run that fails after such a merge leaves the warehouse as it was.
#[test]
fn a_merge_marks_the_rows_it_replaces_and_every_read_leaves_them_out() {
    let p = Project::empty();
    p.write(
        "pipelines/p.yaml",
        "sources:\n  items:\n    format: csv\n    location: data/\n    mode: merge\n    keys: [id]\n    \
         incremental: { files: new }\n    schema:\n      id: { type: int, required: true }\n      price: int\n\
         models:\n  - sql/item_total.sql\n\
         tests:\n  - sql: { name: total is positive, query: select * from item_total where total <= 0 }\n",
    );
    p.write(
        "sql/item_total.sql",
        "select count(*) as items, sum(price) as total from raw_p_items\n",
    );
    // Enough rows that marking a few beats rewriting the file.
    let first: String = (1..=2000).map(|i| format!("{i},{i}\n")).collect();
    p.write("data/items_1.csv", format!("id,price\n{first}"));
    p.ok(&["run"]);
    let before = data_files(&p, "raw_p_items");
    assert_eq!(before.len(), 1, "{before:?}");

    // 3 and 7 change, 2001 is new: two rows of the file are marked, the file stays.
    p.write("data/items_2.csv", "id,price\n3,300\n7,700\n2001,2001\n");
    p.ok(&["run"]);
    let after = data_files(&p, "raw_p_items");
    assert!(after.contains(&before[0]), "{after:?}");
    assert_eq!(
        after.len(),
        3,
        "the file, the changed rows' file, one deletion vector: {after:?}"
    );
    assert!(
        after.iter().any(|n| n.starts_with("deletion_vector_")),
        "{after:?}"
    );
    let total: i64 = 2000 * 2001 / 2 - 3 - 7 + 300 + 700 + 2001;
    let expected = [["2001".to_string(), total.to_string()]];
    assert_eq!(
        p.query("select count(*), sum(price) from raw_p_items"),
        expected
    );
    assert_eq!(
        p.query("select price from raw_p_items where id in (3, 7) order by id"),
        [["300"], ["700"]]
    );
    // Built in the same run, from the merged table as the run held it.
    assert_eq!(p.query("select items, total from item_total"), expected);
    let tables = p.ok(&["tables"]);
    let line = tables
        .lines()
        .find(|l| l.contains("raw_p_items"))
        .unwrap_or_else(|| panic!("{tables}"));
    assert!(line.split_whitespace().any(|w| w == "2001"), "{line}");

    // The model's test fails after the merge marked row 4: nothing is committed, and neither the
    // marked file nor anything else is deleted or left behind.
    p.write("data/items_3.csv", "id,price\n4,-3000000\n");
    p.fails_cleanly_with(3, &["run"], &[], &["total is positive"], &[]);
    assert_eq!(
        p.query("select count(*), sum(price) from raw_p_items"),
        expected
    );

    // Once the file is right the batch loads, its row marked beside the two before; a full
    // refresh rebuilds the table without marks.
    p.write("data/items_3.csv", "id,price\n4,40\n");
    p.ok(&["run"]);
    assert_eq!(
        p.scalar("select sum(price) from raw_p_items"),
        total - 4 + 40
    );
    assert_eq!(
        p.query("select id from raw_p_items where id < 8 and price = id order by id"),
        [["1"], ["2"], ["5"], ["6"]]
    );
    p.ok(&["run", "--full-refresh"]);
    assert_eq!(
        p.scalar("select sum(price) from raw_p_items"),
        total - 4 + 40
    );
    assert_eq!(p.scalar("select count(*) from raw_p_items"), 2001);
}
