//! SQL text that kbcrm generates: identifiers and literals quoted the one way every dialect it
//! speaks (DataFusion, PostgreSQL, MySQL in ANSI_QUOTES mode) reads them.
//!
//! A leaf: imports nothing from kbcrm.

/// `"name"`, with any `"` in it doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'`, with any `'` in it doubled.
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Quoted identifiers separated by commas.
pub fn column_list<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> String {
    names
        .into_iter()
        .map(|n| quote_ident(n.as_ref()))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_are_doubled_inside() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(column_list(["a", "b c"]), r#""a", "b c""#);
    }
}
