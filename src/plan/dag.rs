//! Model dependencies read from the SQL, and the order that follows from them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;

use datafusion::sql::parser::{DFParser, Statement as DFStatement};
use datafusion::sql::resolve::resolve_table_references;
use datafusion::sql::sqlparser::ast::{self, Spanned, visit_relations};

use crate::error::{Position, Problem};

/// Table functions DataFusion provides; a model calling one does not read a table by that name.
const TABLE_FUNCTIONS: &[&str] = &["generate_series", "range", "unnest"];

/// A table a model reads, with where the name appears in its SQL.
#[derive(Debug, Clone)]
pub struct TableRef {
    /// Lower-cased table name.
    pub name: String,
    /// First place the name appears.
    pub position: Position,
}

/// Parse a model's SQL: exactly one query. Returns the tables it reads (CTE names excluded).
pub fn parse_model_sql(
    file: &std::path::Path,
    text: &Arc<String>,
) -> Result<Vec<TableRef>, Problem> {
    let mut statements = DFParser::parse_sql(text).map_err(|e| sql_problem(file, text, &e))?;
    let statement = match (statements.pop_front(), statements.pop_front()) {
        (Some(s), None) => s,
        (None, _) => {
            return Err(Problem::new(file, "the file holds no SQL statement")
                .help("a model is one SELECT; its file name is the table it builds"));
        }
        (Some(_), Some(_)) => {
            return Err(Problem::new(file, "the file holds more than one statement")
                .help("a model is one SELECT; split the statements into files of their own"));
        }
    };
    let query = match &statement {
        DFStatement::Statement(s) => match s.as_ref() {
            ast::Statement::Query(q) => q.clone(),
            other => {
                let span = other.span();
                let mut p = Problem::new(
                    file,
                    "a model must be a query (SELECT, WITH ... SELECT or VALUES)",
                )
                .help("kbcrm writes the table itself; remove CREATE/INSERT/UPDATE from the model");
                if span.start.line > 0 {
                    p = p.at(
                        Position::of_line_col(
                            text,
                            span.start.line as usize,
                            span.start.column as usize,
                            0,
                        ),
                        text,
                    );
                }
                return Err(p);
            }
        },
        _ => {
            return Err(Problem::new(
                file,
                "a model must be a query (SELECT, WITH ... SELECT or VALUES)",
            ));
        }
    };
    let (tables, _ctes) = resolve_table_references(&statement, true)
        .map_err(|e| Problem::new(file, format!("cannot read the tables of this query: {e}")))?;
    let wanted: BTreeSet<String> = tables
        .iter()
        .map(|t| t.table().to_string())
        .filter(|t| !TABLE_FUNCTIONS.contains(&t.as_str()))
        .collect();
    // Positions: the first occurrence of each name among the relations of the query.
    let mut positions: HashMap<String, Position> = HashMap::new();
    let _ = visit_relations(&*query, |name: &ast::ObjectName| {
        if let Some(last) = name.0.last().and_then(|p| p.as_ident()) {
            let key = if last.quote_style.is_some() {
                last.value.clone()
            } else {
                last.value.to_lowercase()
            };
            let span = name.span();
            if span.start.line > 0 && !positions.contains_key(&key) {
                let len = name.to_string().len();
                positions.insert(
                    key,
                    Position::of_line_col(
                        text,
                        span.start.line as usize,
                        span.start.column as usize,
                        len,
                    ),
                );
            }
        }
        ControlFlow::<()>::Continue(())
    });
    Ok(wanted
        .into_iter()
        .map(|name| TableRef {
            position: positions.get(&name).copied().unwrap_or_default(),
            name,
        })
        .collect())
}

/// A SQL syntax error as a problem at its line and column.
pub fn sql_problem(
    file: &std::path::Path,
    text: &Arc<String>,
    err: &dyn std::fmt::Display,
) -> Problem {
    let msg = err.to_string();
    let clean = msg
        .trim_start_matches("SQL error: ")
        .trim_start_matches("ParserError(\"")
        .trim_end_matches("\")")
        .trim_start_matches("sql parser error: ")
        .to_string();
    let mut problem = Problem::new(
        file,
        format!("SQL syntax error: {}", strip_location(&clean)),
    );
    if let Some((line, col)) = find_line_col(&clean) {
        problem = problem.at(Position::of_line_col(text, line, col, 1), text);
    }
    problem
}

fn strip_location(msg: &str) -> String {
    match msg.find(" at Line: ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// Find "Line: N, Column: M" in a parser message.
pub fn find_line_col(msg: &str) -> Option<(usize, usize)> {
    let i = msg.find("Line: ")?;
    let rest = &msg[i + 6..];
    let line: usize = rest
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    let j = rest.find("Column: ")?;
    let col: usize = rest[j + 8..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()?;
    Some((line, col))
}

/// Order `nodes` (name -> dependencies) so that every node comes after what it depends on.
/// On a cycle, returns the names on it, in order.
pub fn topo_order(nodes: &BTreeMap<String, Vec<String>>) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit(
        n: &str,
        nodes: &BTreeMap<String, Vec<String>>,
        marks: &mut HashMap<String, Mark>,
        stack: &mut Vec<String>,
        out: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|s| s == n).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(n.to_string());
                return Err(cycle);
            }
            None => {}
        }
        marks.insert(n.to_string(), Mark::Visiting);
        stack.push(n.to_string());
        for d in nodes.get(n).into_iter().flatten() {
            if nodes.contains_key(d) {
                visit(d, nodes, marks, stack, out)?;
            }
        }
        stack.pop();
        marks.insert(n.to_string(), Mark::Done);
        out.push(n.to_string());
        Ok(())
    }
    let mut marks = HashMap::new();
    let mut out = Vec::with_capacity(nodes.len());
    for n in nodes.keys() {
        visit(n, nodes, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn deps(sql: &str) -> Result<Vec<String>, Problem> {
        let text = Arc::new(sql.to_string());
        parse_model_sql(Path::new("m.sql"), &text).map(|v| v.into_iter().map(|t| t.name).collect())
    }

    #[test]
    fn reads_tables_not_ctes() {
        let sql = "with o as (select * from Raw_Orders), c as (select * from dim_customer)\n\
                   select * from o join c using (id) where id in (select id from x.y)";
        assert_eq!(deps(sql).unwrap(), vec!["dim_customer", "raw_orders", "y"]);
    }

    #[test]
    fn positions_and_errors() {
        let text = Arc::new("select *\nfrom  orders".to_string());
        let refs = parse_model_sql(Path::new("m.sql"), &text).unwrap();
        assert_eq!((refs[0].position.line, refs[0].position.column), (2, 7));
        let e = deps("select * frm t").unwrap_err();
        assert_eq!(e.position.map(|p| p.line), Some(1), "{e}");
        assert!(e.message.starts_with("SQL syntax error"), "{e}");
        assert!(deps("select 1; select 2").is_err());
        assert!(deps("create table t as select 1").is_err());
    }

    #[test]
    fn orders_and_finds_cycles() {
        let mut g = BTreeMap::new();
        g.insert("c".to_string(), vec!["b".to_string()]);
        g.insert("b".to_string(), vec!["a".to_string()]);
        g.insert("a".to_string(), vec![]);
        assert_eq!(topo_order(&g).unwrap(), vec!["a", "b", "c"]);
        g.insert("a".to_string(), vec!["c".to_string()]);
        let cycle = topo_order(&g).unwrap_err();
        assert_eq!(cycle.len(), 4);
        assert_eq!(cycle.first(), cycle.last());
    }
}
