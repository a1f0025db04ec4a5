use super::*;

/// A record: id, e-mail, phone, name, postcode.
type Row = [Option<String>; 5];

/// A pseudo-random number below `n`.
fn next(state: &mut u64, n: u64) -> u64 {
    *state = state
        .wrapping_mul(6_364_136_223_846_793_005)
        .wrapping_add(1_442_695_040_888_963_407);
    (*state >> 33) % n
}

/// A record of `table` whose e-mail, phone and name overlap with others' at random; one in
/// fifty has no id when `ids_missing`.
fn random_row(state: &mut u64, id: String, ids_missing: bool) -> Row {
    [
        (!ids_missing || next(state, 50) > 0).then_some(id),
        (next(state, 4) > 0).then(|| format!(" P{}@Mail.example ", next(state, 400))),
        (next(state, 3) > 0).then(|| format!("0{}", 30_000 + next(state, 300))),
        Some(format!("Name {}", next(state, 60))),
        (next(state, 2) > 0).then(|| format!("{}", 10_000 + next(state, 5))),
    ]
}

/// Register `rows` as table `name`.
fn register(ctx: &SessionContext, name: &str, rows: &[Row]) {
    use datafusion::datasource::MemTable;
    let schema = Arc::new(Schema::new(
        ["id", "email", "phone", "name", "postcode"]
            .map(|c| Field::new(c, DataType::Utf8, true))
            .to_vec(),
    ));
    let arrays: Vec<ArrayRef> = (0..5)
        .map(|c| Arc::new(StringArray::from_iter(rows.iter().map(|r| r[c].clone()))) as ArrayRef)
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), arrays).unwrap();
    let t = MemTable::try_new(schema, vec![vec![batch]]).unwrap();
    ctx.deregister_table(name).unwrap();
    ctx.register_table(name, Arc::new(t)).unwrap();
}

/// Register a batch as table `name`.
fn register_batch(ctx: &SessionContext, name: &str, batch: &RecordBatch) {
    use datafusion::datasource::MemTable;
    let t = MemTable::try_new(batch.schema(), vec![vec![batch.clone()]]).unwrap();
    ctx.deregister_table(name).unwrap();
    ctx.register_table(name, Arc::new(t)).unwrap();
}

/// The rows of sources `a` (900) and `b` (700), made with `seed`.
fn sample(seed: u64, ids_missing: bool) -> [Vec<Row>; 2] {
    let mut state = seed;
    [("a", 900), ("b", 700)].map(|(table, n)| {
        (0..n)
            .map(|i| random_row(&mut state, format!("{table}{i}"), ids_missing))
            .collect()
    })
}

/// The identity over tables `a` and `b`, matched by e-mail, phone, then name and postcode,
/// with groups of more than six records ignored.
fn identity_over_a_and_b() -> Identity {
    let fields: Vec<(String, String)> = ["email", "phone", "name", "postcode"]
        .iter()
        .map(|f| (f.to_string(), f.to_string()))
        .collect();
    let source = |name: &str| RecordSource {
        name: name.to_string(),
        table: name.to_string(),
        id: "id".to_string(),
        updated_at: None,
        fields: fields.clone(),
    };
    Identity {
        pipeline: "p".to_string(),
        entity: "customer".to_string(),
        map_table: "map".to_string(),
        golden_table: "golden".to_string(),
        id_column: "customer_id".to_string(),
        id_prefix: "C".to_string(),
        sources: vec![source("a"), source("b")],
        rules: vec![
            ("email".to_string(), vec!["email".to_string()]),
            ("phone".to_string(), vec!["phone".to_string()]),
            (
                "name_postcode".to_string(),
                vec!["name".to_string(), "postcode".to_string()],
            ),
        ],
        normalize: HashMap::from([
            ("email".to_string(), Normalizer::Email),
            ("phone".to_string(), Normalizer::Phone),
            ("name".to_string(), Normalizer::Name),
        ]),
        default_cc: "49".to_string(),
        survivorship: Vec::new(),
        max_group: 6,
    }
}

/// Two record sources whose e-mails, phones and names overlap at random, some keys shared
/// by more records than `max_group`, some records without an id.
fn overlapping_sources(ctx: &SessionContext) -> Identity {
    let [a, b] = sample(7, true);
    register(ctx, "a", &a);
    register(ctx, "b", &b);
    identity_over_a_and_b()
}

/// A batch's rows as text, each row's first `columns` columns (the key columns first),
/// keyed by the first two.
fn rows_by_record(batch: &RecordBatch, columns: usize) -> HashMap<(String, String), Vec<String>> {
    use arrow::util::display::{ArrayFormatter, FormatOptions};
    let options = FormatOptions::default().with_null("∅");
    let formatters: Vec<ArrayFormatter> = (0..columns)
        .map(|c| ArrayFormatter::try_new(batch.column(c).as_ref(), &options).unwrap())
        .collect();
    (0..batch.num_rows())
        .map(|i| {
            let row: Vec<String> = formatters.iter().map(|f| f.value(i).to_string()).collect();
            ((row[0].clone(), row[1].clone()), row)
        })
        .collect()
}

/// The day-1 resolution of `day1`; then, the context holding `day2` (`day1` with the rows
/// of `added`), the whole resolution and the one of the added rows (and its `Since`).
async fn resolved_on_day_two(
    identity: &Identity,
    day1: &[Vec<Row>; 2],
    day2: &[Vec<Row>; 2],
    added: &[Vec<Row>; 2],
) -> (Resolution, Resolution, Resolution, SessionContext, Since) {
    let ctx = SessionContext::new();
    register(&ctx, "a", &day1[0]);
    register(&ctx, "b", &day1[1]);
    let first = identity.resolve(&ctx, 1, None).await.unwrap();
    assert!(first.whole);
    let ctx = SessionContext::new();
    register(&ctx, "a", &day2[0]);
    register(&ctx, "b", &day2[1]);
    register(&ctx, "added_a", &added[0]);
    register(&ctx, "added_b", &added[1]);
    register_batch(&ctx, "map", &first.map);
    register_batch(&ctx, &identity.keys_table(), &first.keys);
    let whole = identity.resolve(&ctx, 2, None).await.unwrap();
    let since = Since {
        added: vec!["added_a".into(), "added_b".into()],
        rows_then: day1.iter().map(|r| r.len() as u64).collect(),
        rows_now: day2.iter().map(|r| r.len() as u64).collect(),
        last: Some(first.stats.last()),
    };
    let part = identity.resolve(&ctx, 2, Some(&since)).await.unwrap();
    assert!(whole.whole && !part.whole);
    (first, whole, part, ctx, since)
}

/// `part`, a resolution of the added rows after `first`, gives what `whole` gives: the same
/// figures and regrouped ids; `first`'s tables with its rows merged in are `whole`'s; its
/// map rows are those whose id or rule changed.
fn assert_gives_the_whole(first: &Resolution, part: &Resolution, whole: &Resolution) {
    assert_eq!(part.stats.to_string(), whole.stats.to_string());
    assert_eq!(part.stats.last(), whole.stats.last());
    assert_eq!(part.regrouped, whole.regrouped);
    for (day1_rows, changes, all, columns) in [
        (&first.map, &part.map, &whole.map, 4),
        (
            &first.keys,
            &part.keys,
            &whole.keys,
            first.keys.num_columns(),
        ),
    ] {
        let mut merged = rows_by_record(day1_rows, columns);
        merged.extend(rows_by_record(changes, columns));
        assert_eq!(merged, rows_by_record(all, columns));
    }
    let before = rows_by_record(&first.map, 4);
    let moved: HashSet<(String, String)> = rows_by_record(&whole.map, 4)
        .into_iter()
        .filter(|(record, row)| before.get(record) != Some(row))
        .map(|(record, _)| record)
        .collect();
    assert!(!moved.is_empty());
    assert_eq!(
        rows_by_record(&part.map, 4)
            .into_keys()
            .collect::<HashSet<_>>(),
        moved
    );
}

/// Matching only the rows added since the last resolution, every other record's keys read
/// from the match-key table, gives the ids, rules, keys and figures of matching every
/// record again; a record gone makes it match every record.
#[tokio::test]
async fn matching_the_added_rows_gives_what_matching_every_record_gives() {
    let identity = identity_over_a_and_b();
    let day1 = sample(11, false);
    // Day 2: one record of `a` in nine gets another e-mail and phone, and 80 new records
    // join each source (new customers, and links that merge and split clusters).
    let mut state = 99u64;
    let mut day2 = day1.clone();
    let mut added: [Vec<Row>; 2] = Default::default();
    for (i, row) in day2[0].iter_mut().enumerate() {
        if i % 9 == 0 {
            let changed = random_row(&mut state, row[0].clone().unwrap_or_default(), false);
            row[1] = changed[1].clone();
            row[2] = changed[2].clone();
            added[0].push(row.clone());
        }
    }
    for (s, table) in ["a", "b"].iter().enumerate() {
        for i in 0..80 {
            let row = random_row(&mut state, format!("{table}new{i}"), false);
            day2[s].push(row.clone());
            added[s].push(row);
        }
    }
    let (first, whole, part, ctx, since) =
        resolved_on_day_two(&identity, &day1, &day2, &added).await;
    let stats = whole.stats.to_string();
    assert!(
        whole.stats.new_ids > 0 && whole.stats.merged_ids > 0,
        "{stats}"
    );
    assert!(stats.contains("oversized match keys ignored"), "{stats}");
    assert_gives_the_whole(&first, &part, &whole);
    // Without the last resolution's figures, every record is matched.
    let unrecorded = Since {
        last: None,
        ..since.clone()
    };
    let again = identity.resolve(&ctx, 2, Some(&unrecorded)).await.unwrap();
    assert!(again.whole);
    assert_eq!(again.stats.to_string(), stats);
    // A record removed from `b`: the tables no longer add up, every record is matched.
    let gone = Since {
        rows_now: vec![since.rows_now[0], since.rows_now[1] - 1],
        ..since
    };
    let again = identity.resolve(&ctx, 2, Some(&gone)).await.unwrap();
    assert!(again.whole);
    assert_eq!(again.stats.to_string(), stats);
}

/// Among many records, a few added rows reach few of them: only those are matched again,
/// and what they give is still what matching every record gives, where a group grows past
/// `max_group` and where one shrinks under it.
#[tokio::test]
async fn matching_the_added_rows_matches_only_the_records_they_reach() {
    let identity = identity_over_a_and_b();
    let row = |id: String, email: String, phone: Option<&str>| -> Row {
        [Some(id), Some(email), phone.map(str::to_string), None, None]
    };
    // Day 1: 1,500 pairs, a{i} and b{i} sharing e-mail e{i}; a0-a39 share a phone (a group
    // past `max_group`, ignored), and a100-a106 another (seven, one too many).
    let phone = |i: usize| match i {
        0..40 => Some("030 5550111"),
        100..107 => Some("030 5550333"),
        _ => None,
    };
    let day1: [Vec<Row>; 2] = [
        (0..1500)
            .map(|i| row(format!("a{i}"), format!("e{i}@mail.example"), phone(i)))
            .collect(),
        (0..1500)
            .map(|i| row(format!("b{i}"), format!("e{i}@mail.example"), None))
            .collect(),
    ];
    // Day 2: a5 takes a7's e-mail (b5 is left alone, a5 joins a7's id); a100 loses its
    // phone, so a101-a106 match by it; b1500 shares e9; a1500 joins the 40 of one phone;
    // a1501 and b1501 are a new pair.
    let mut day2 = day1.clone();
    day2[0][5][1] = Some("e7@mail.example".into());
    day2[0][100][2] = None;
    let new = [
        vec![
            row(
                "a1500".into(),
                "n0@mail.example".into(),
                Some("030 5550111"),
            ),
            row("a1501".into(), "n1@mail.example".into(), None),
        ],
        vec![
            row("b1500".into(), "e9@mail.example".into(), None),
            row("b1501".into(), "n1@mail.example".into(), None),
        ],
    ];
    let mut added = [vec![day2[0][5].clone(), day2[0][100].clone()], Vec::new()];
    for s in 0..2 {
        day2[s].extend(new[s].iter().cloned());
        added[s].extend(new[s].iter().cloned());
    }
    let (first, whole, part, _, _) = resolved_on_day_two(&identity, &day1, &day2, &added).await;
    assert_gives_the_whole(&first, &part, &whole);
    let stats = whole.stats.to_string();
    // a7's id and five of a101-a106's go; a1500, and a1501 with b1501, get new ids. b5
    // keeps its id, which a5, a7 and b7 now have too: one customer.
    let expected = "identity customer: 3004 records -> 1496 customers (2 new, 6 merged)";
    assert!(stats.starts_with(expected), "{stats}");
    assert!(
        stats.ends_with("; 1 oversized match keys ignored"),
        "{stats}"
    );
    // The records reached: those of the ids of a0-a39 (phone 030 5550111, a5, a7 and a9
    // among them) and of a100-a106 (phone 030 5550333), two records each, and the four new.
    let reached = part.record_ids.source.len();
    assert_eq!(reached, 2 * (40 + 7) + 4, "{stats}");
    assert_eq!(whole.record_ids.source.len(), 3004);
    let a = |ids: &[&str]| ids.iter().map(|i| i.to_string()).collect::<HashSet<_>>();
    assert!(
        part.record_ids
            .ids_of(&[a(&["a5", "a100"]), a(&["b1500"])])
            .is_some()
    );
    assert_eq!(
        part.record_ids.ids_of(&[a(&["a600"]), HashSet::new()]),
        None
    );
}

/// Records loaded and grouped on several threads give the map and figures of one thread.
#[tokio::test]
async fn matching_side_by_side_gives_the_map_of_one_thread() {
    let mut maps = Vec::new();
    for threads in [1, 2, 3] {
        let config = datafusion::prelude::SessionConfig::new().with_target_partitions(threads);
        let ctx = SessionContext::new_with_config(config);
        let identity = overlapping_sources(&ctx);
        let r = identity.resolve(&ctx, 0, None).await.unwrap();
        maps.push((r.map, r.stats.to_string()));
    }
    let (one, stats) = &maps[0];
    assert!(stats.contains("oversized match keys ignored"), "{stats}");
    assert!(one.num_rows() > 1500, "{stats}");
    let ids = one.column(2).as_string::<i32>();
    let distinct: HashSet<&str> = ids.iter().flatten().collect();
    assert!(distinct.len() < one.num_rows() / 2, "{stats}");
    for (map, s) in &maps[1..] {
        assert_eq!(map, one);
        assert_eq!(s, stats);
    }
}

#[test]
fn run_split_keeps_the_order_of_the_parts() {
    for threads in 1..5 {
        assert_eq!(run_split(7, threads, |i| i * i), [0, 1, 4, 9, 16, 25, 36]);
    }
    assert!(run_split(0, 2, |i| i).is_empty());
}

#[test]
fn a_key_survives_its_two_stored_halves() {
    for key in [
        0,
        1,
        Key::MAX,
        1 << 63,
        1 << 64,
        (1 << 127) | 5,
        key_of(["x"].into_iter(), &mut String::new()),
    ] {
        let (hi, lo) = split_key(key);
        assert_eq!(join_key(hi, lo), key);
    }
}

#[test]
fn union_find_joins_transitively() {
    let mut uf = UnionFind((0..5).collect());
    uf.union(0, 3);
    uf.union(3, 4);
    assert_eq!(uf.find(4), 0);
    assert_ne!(uf.find(1), uf.find(4));
}

#[test]
fn regrouping_names_changed_and_vanished_ids() {
    let set = |ids: &[&str]| ids.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
    // Records 0-3 were C1, C1, C2, C3; C2's record joins C1, a new record starts C4.
    let now = ["C1", "C1", "C1", "C3", "C4"];
    let before = [Some("C1"), Some("C1"), Some("C2"), Some("C3"), None];
    let r = regrouped_ids(4, &now, before.into_iter()).expect("no record lost");
    assert_eq!(r.changed, set(&["C1", "C4"]));
    assert_eq!(r.gone, set(&["C2"]));
    // Nothing moved: nothing to rebuild.
    let same = regrouped_ids(2, &["C1", "C2"], [Some("C1"), Some("C2")].into_iter());
    assert_eq!(same, Some(Regrouped::default()));
    // A record the map held is gone: everything is rebuilt.
    assert_eq!(regrouped_ids(3, &["C1"], [Some("C1")].into_iter()), None);
}
