//! `kbcrm freshness`: the age of each source's newest file against its thresholds.

use std::process::Command;

use crate::support::{Project, stderr, stdout};

fn source(name: &str, thresholds: &str) -> String {
    format!(
        "  {name}:\n    format: csv\n    location: data/{name}/\n    {thresholds}\n    schema:\n      \
         id: {{ type: string }}\n"
    )
}

fn age(p: &Project, file: &str, ago: &str) {
    p.write(file, "id\n1\n");
    let ok = Command::new("touch")
        .args(["-d", ago])
        .arg(p.path().join(file))
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn stale_sources_warn_and_fail() {
    let p = Project::empty();
    let limits = "freshness: { warn_after: 1h, error_after: 2h }";
    p.write(
        "pipelines/p.yaml",
        format!(
            "sources:\n{}{}{}{}",
            source("fresh", limits),
            source("late", limits),
            source("stale", limits),
            source("unwatched", "description: no thresholds")
        ),
    );
    age(&p, "data/fresh/a.csv", "10 minutes ago");
    age(&p, "data/late/a.csv", "3 hours ago");
    age(&p, "data/late/b.csv", "90 minutes ago");
    age(&p, "data/stale/a.csv", "5 hours ago");
    age(&p, "data/unwatched/a.csv", "30 days ago");
    let out = p.kbcrm(&["freshness"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let text = stdout(&out);
    let status = |source: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(source))
            .and_then(|l| l.split_whitespace().last())
            .unwrap_or_else(|| panic!("no line for {source}:\n{text}"))
            .to_string()
    };
    assert_eq!(status("fresh"), "ok");
    assert_eq!(status("late"), "warn", "the newest file counts");
    assert_eq!(status("stale"), "error");
    assert!(!text.contains("unwatched"), "{text}");
    assert!(
        stderr(&out).contains("stale sources past their error_after: p.stale"),
        "{}",
        stderr(&out)
    );
    let all = p.kbcrm(&["freshness", "--all"]);
    assert!(stdout(&all).contains("unwatched"));
    // Without the stale source nothing fails.
    std::fs::remove_file(p.path().join("data/stale/a.csv")).unwrap();
    age(&p, "data/stale/b.csv", "1 minute ago");
    let out = p.kbcrm(&["freshness"]);
    assert_eq!(out.status.code(), Some(0), "{}", stdout(&out));

    p.write(
        "pipelines/p.yaml",
        format!(
            "sources:\n{}",
            source("fresh", "freshness: { warn_after: soon }")
        ),
    );
    let out = p.kbcrm(&["validate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("pipelines/p.yaml:5:30")
            && stderr(&out).contains("freshness.warn_after: 'soon'"),
        "{}",
        stderr(&out)
    );
}
