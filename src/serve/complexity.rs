//! How deep a statement's syntax tree can get, read from its text before it is parsed.
//!
//! The SQL parser builds chains of binary operators (`1+1+...`, `a AND b AND ...`), casts and
//! set operations (`UNION ALL ...`) in a loop, so their trees get as deep as the text is long;
//! everything that walks, clones or drops such a tree afterwards recurses once per level. A
//! statement is measured here in one pass without building anything, and one that could nest
//! deeper than [`MAX_DEPTH`] levels, or has more than [`MAX_TOKENS`] tokens, is refused with
//! PostgreSQL's 54001 before the parser sees it.
//!
//! The measure is an upper bound: per parenthesis (or `CASE ... END`) level, the operators of
//! the current expression chain plus the set operations and joins of that level, summed over
//! the enclosing levels. Commas and clause keywords end a chain.

/// Deepest nesting a statement may reach (as measured here). The engine's planning time grows
/// with the square of a chain's length and cannot be interrupted (BENCHMARKS.md has the planning
/// time at this depth): this keeps any statement's planning short.
pub const MAX_DEPTH: usize = 1_000;

/// Most planning work a statement may ask for, counted as the sum of the squares of its chains'
/// lengths (one chain of [`MAX_DEPTH`] operators, or many short ones): many chains of a
/// thousand operators side by side would plan as long as their count times one.
pub const MAX_WORK: usize = MAX_DEPTH * MAX_DEPTH;

/// Most tokens in one query message.
pub const MAX_TOKENS: usize = 2_000_000;

/// Why a statement is refused.
#[derive(Debug, PartialEq)]
pub enum TooComplex {
    /// Nesting deeper than the limit.
    Deep(usize),
    /// More tokens than the limit.
    Long(usize),
    /// More planning work than the limit.
    Wide(usize),
}

impl std::fmt::Display for TooComplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TooComplex::Deep(_) => write!(
                f,
                "statement too complex: its expressions nest more than {MAX_DEPTH} levels deep \
                 (long chains of operators, ANDs, ORs or UNIONs count one level each); split it \
                 or use IN (...) lists"
            ),
            TooComplex::Long(_) => write!(
                f,
                "statement too complex: more than {MAX_TOKENS} tokens in one query"
            ),
            TooComplex::Wide(_) => write!(
                f,
                "statement too complex: too many long chains of operators, ANDs, ORs or \
                 UNIONs; split it or use IN (...) lists"
            ),
        }
    }
}

#[derive(Default, Clone, Copy)]
struct Level {
    /// Depth of the enclosing levels.
    base: usize,
    /// Operators in the current expression chain.
    chain: usize,
    /// Set operations, joins and FROM-list items of this level.
    flat: usize,
    /// Inside a FROM list (its commas add relations).
    in_from: bool,
    /// Opened by CASE (closed by END) rather than a bracket.
    case: bool,
}

impl Level {
    fn depth(&self) -> usize {
        self.base + 1 + self.chain + self.flat
    }
}

/// Keywords that continue an expression chain one level deeper.
const CHAIN_WORDS: &[&str] = &[
    "and", "or", "is", "like", "ilike", "similar", "between", "in", "collate", "at", "overlaps",
    "isnull", "notnull",
];

/// Keywords that stack relations or queries at the same level.
const FLAT_WORDS: &[&str] = &["union", "intersect", "except", "join"];

/// Keywords that end an expression chain (a new clause starts).
const CLAUSE_WORDS: &[&str] = &[
    "select",
    "from",
    "where",
    "group",
    "having",
    "order",
    "limit",
    "offset",
    "fetch",
    "on",
    "using",
    "window",
    "values",
    "returning",
    "when",
    "then",
    "else",
    "qualify",
];

/// Check `sql` against the limits.
pub fn check(sql: &str) -> Result<(), TooComplex> {
    let b = sql.as_bytes();
    let mut levels = vec![Level::default()];
    let mut tokens = 0usize;
    let mut deepest = 0usize;
    let mut work = 0usize;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        tokens += 1;
        if tokens > MAX_TOKENS {
            return Err(TooComplex::Long(tokens));
        }
        let top = levels.len() - 1;
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                tokens -= 1;
                i = skip_line_comment(b, i);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                tokens -= 1;
                i = skip_block_comment(b, i);
            }
            b'\'' => i = skip_quoted(b, i, b'\'', false),
            b'"' => i = skip_quoted(b, i, b'"', false),
            b'$' => i = skip_dollar(b, i),
            b'(' | b'[' => {
                let base = levels[top].depth();
                levels.push(Level {
                    base,
                    ..Level::default()
                });
                i += 1;
            }
            b')' | b']' => {
                close_bracket(&mut levels);
                i += 1;
            }
            b',' => {
                let l = &mut levels[top];
                if l.in_from {
                    l.flat += 1;
                }
                l.chain = 0;
                i += 1;
            }
            b';' => {
                levels.truncate(1);
                levels[0] = Level::default();
                i += 1;
            }
            b'0'..=b'9' | b'.' => i = skip_number(b, i),
            c if c.is_ascii_alphabetic() || c == b'_' || c >= 0x80 => {
                let start = i;
                i = word_end(b, i);
                // E'...' strings take backslash escapes.
                if i - start == 1 && matches!(c, b'e' | b'E') && b.get(i) == Some(&b'\'') {
                    i = skip_quoted(b, i, b'\'', true);
                    continue;
                }
                work += on_word(&mut levels, &sql[start..i]);
            }
            _ => {
                // An operator: one token of operator characters.
                i = skip_operator(b, i);
                let l = &mut levels[top];
                work += 2 * l.chain + 1;
                l.chain += 1;
            }
        }
        if work > MAX_WORK {
            return Err(TooComplex::Wide(work));
        }
        let depth = levels[levels.len() - 1].depth();
        deepest = deepest.max(depth);
        if deepest > MAX_DEPTH {
            return Err(TooComplex::Deep(deepest));
        }
    }
    Ok(())
}

/// Past a `--` comment starting at `i`: the start of the next line.
fn skip_line_comment(b: &[u8], i: usize) -> usize {
    b[i..]
        .iter()
        .position(|&x| x == b'\n')
        .map_or(b.len(), |p| i + p + 1)
}

/// Closes the innermost bracket level, and any CASE left open inside it.
fn close_bracket(levels: &mut Vec<Level>) {
    // A CASE left open inside the bracket closes with it.
    while levels.len() > 1 && levels[levels.len() - 1].case {
        levels.pop();
    }
    if levels.len() > 1 {
        levels.pop();
    }
}

/// Past a number (or a lone `.`) starting at `i`.
fn skip_number(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
        i += 1;
    }
    i
}

/// Past a keyword or name starting at `i`.
fn word_end(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] >= 0x80) {
        i += 1;
    }
    i
}

/// Past an operator starting at `i`: one token of operator characters, stopping before a
/// comment.
fn skip_operator(b: &[u8], mut i: usize) -> usize {
    i += 1;
    while i < b.len() && b"+-*/<>=~!@#%^&|`?:".contains(&b[i]) {
        if b[i] == b'-' && b.get(i + 1) == Some(&b'-') {
            break;
        }
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            break;
        }
        i += 1;
    }
    i
}

/// Applies a keyword or name to the innermost level; returns the planning work it adds.
fn on_word(levels: &mut Vec<Level>, word: &str) -> usize {
    let mut work = 0;
    let top = levels.len() - 1;
    let l = &mut levels[top];
    if CHAIN_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
        work += 2 * l.chain + 1;
        l.chain += 1;
    } else if FLAT_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
        work += 2 * l.flat + 1;
        l.flat += 1;
        l.chain = 0;
    } else if word.eq_ignore_ascii_case("case") {
        let base = l.depth();
        levels.push(Level {
            base,
            case: true,
            ..Level::default()
        });
    } else if word.eq_ignore_ascii_case("end") {
        if l.case {
            levels.pop();
        }
    } else if CLAUSE_WORDS.iter().any(|w| word.eq_ignore_ascii_case(w)) {
        l.chain = 0;
        l.in_from = word.eq_ignore_ascii_case("from");
    }
    work
}

/// Past a quoted string or identifier starting at `i` (doubled quotes escape; with
/// `backslash`, a backslash escapes the next byte too).
fn skip_quoted(b: &[u8], mut i: usize, quote: u8, backslash: bool) -> usize {
    i += 1;
    while i < b.len() {
        if backslash && b[i] == b'\\' {
            i += 2;
            continue;
        }
        if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    b.len()
}

/// Past a (nested) block comment starting at `i`.
fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while i + 1 < b.len() {
        if b[i] == b'/' && b[i + 1] == b'*' {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b[i + 1] == b'/' {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// Past `$1` (a parameter) or a dollar-quoted string `$tag$...$tag$` starting at `i`.
fn skip_dollar(b: &[u8], i: usize) -> usize {
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_alphanumeric() || b[j] == b'_') {
        j += 1;
    }
    if j < b.len() && b[j] == b'$' && !b[i + 1..j].first().is_some_and(u8::is_ascii_digit) {
        let tag = &b[i..=j];
        let body = j + 1;
        return b[body..]
            .windows(tag.len())
            .position(|w| w == tag)
            .map_or(b.len(), |p| body + p + tag.len());
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(term: &str, op: &str, n: usize) -> String {
        format!("select {}", vec![term; n].join(op))
    }

    #[test]
    fn long_operator_chains_are_refused() {
        for op in ["+", " AND ", " OR ", " || ", "::int::"] {
            assert!(check(&chain("1", op, 100)).is_ok(), "{op}");
            assert!(
                matches!(
                    check(&chain("1", op, MAX_DEPTH + 10)),
                    Err(TooComplex::Deep(_))
                ),
                "{op}"
            );
        }
        let unions = vec!["select 1"; MAX_DEPTH + 10].join(" union all ");
        assert!(matches!(check(&unions), Err(TooComplex::Deep(_))));
        let joins = format!(
            "select * from t{}",
            " join t using (a)".repeat(MAX_DEPTH + 10)
        );
        assert!(matches!(check(&joins), Err(TooComplex::Deep(_))));
        let from_list = format!("select * from t{}", ", t".repeat(MAX_DEPTH + 10));
        assert!(matches!(check(&from_list), Err(TooComplex::Deep(_))));
    }

    #[test]
    fn many_long_chains_side_by_side_are_refused() {
        let one = vec!["1"; MAX_DEPTH / 2].join("+");
        assert_eq!(check(&format!("select {one}, {one}")), Ok(()));
        let many = vec![one; 8].join(", ");
        assert!(matches!(
            check(&format!("select {many}")),
            Err(TooComplex::Wide(_))
        ));
    }

    #[test]
    fn case_and_brackets_do_not_hide_a_chain() {
        let term = "case when x = 1 then 1 else 0 end";
        assert!(matches!(
            check(&chain(term, " + ", MAX_DEPTH)),
            Err(TooComplex::Deep(_))
        ));
        let term = "f(a, b)";
        assert!(matches!(
            check(&chain(term, " + ", MAX_DEPTH + 10)),
            Err(TooComplex::Deep(_))
        ));
    }

    #[test]
    fn wide_statements_pass() {
        let list = (0..200_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(
            check(&format!("select * from t where id in ({list})")),
            Ok(())
        );
        let columns = (0..20_000)
            .map(|i| format!("a{i} + b{i} as c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        assert_eq!(check(&format!("select {columns} from t")), Ok(()));
        let cases = (0..5_000)
            .map(|i| format!("when x = {i} then 'v{i}'"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(check(&format!("select case {cases} end from t")), Ok(()));
        let ands = (0..200)
            .map(|i| format!("c{i} = {i}"))
            .collect::<Vec<_>>()
            .join(" and ");
        assert_eq!(check(&format!("select * from t where {ands}")), Ok(()));
    }

    #[test]
    fn strings_comments_and_quotes_hold_no_operators() {
        let plus = "+".repeat(MAX_DEPTH * 2);
        for sql in [
            format!("select '{plus}'"),
            format!("select \"{plus}\" from t"),
            format!("select $x${plus}$x$"),
            format!("select E'\\'{plus}'"),
            format!("select 1 -- {plus}\n"),
            format!("select 1 /* {plus} /* nested */ {plus} */"),
        ] {
            assert_eq!(check(&sql), Ok(()), "{sql:.40}");
        }
        assert!(matches!(
            check(&"1,".repeat(MAX_TOKENS)),
            Err(TooComplex::Long(_))
        ));
    }
}
