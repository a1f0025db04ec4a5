use super::*;

#[test]
fn key_paths_are_found_on_their_lines() {
    let text = "name: p\nserve:\n  listen: x\n  max_connections: 0\nroles:\n  a:\n    \
                    tables: [\"[\"]\n  b: { tables: [x] }\n";
    assert_eq!(
        path_pos(text, &["serve", "listen"]).map(|p| p.line),
        Some(3)
    );
    assert_eq!(
        path_pos(text, &["serve", "max_connections"]).map(|p| p.line),
        Some(4)
    );
    assert_eq!(
        path_pos(text, &["roles", "a", "tables"]).map(|p| p.line),
        Some(7)
    );
    assert_eq!(path_pos(text, &["serve", "tables"]), None);
}
