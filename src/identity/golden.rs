//! The golden record: SQL generated from the survivorship rules over every source's records.

use super::*;

impl Identity {
    /// Golden fields in order of first appearance.
    pub fn golden_fields(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.sources {
            for (f, _) in &s.fields {
                if !out.contains(f) {
                    out.push(f.clone());
                }
            }
        }
        out
    }

    /// The SQL of the golden-record table: every record joined to its id, one row per id, each
    /// field chosen by its survivorship rule.
    pub fn golden_sql(&self) -> String {
        format!(
            "with records as (\n{}\n)\n\n{}",
            self.records_sql(),
            self.golden_select("records")
        )
    }

    /// The SQL of every record joined to its id, each with its golden fields (null where its
    /// source has none), its source, rank, record id and update time.
    pub fn records_sql(&self) -> String {
        let fields = self.golden_fields();
        let id = quote_ident(&self.id_column);
        let records: Vec<String> = self
            .sources
            .iter()
            .enumerate()
            .map(|(rank, s)| {
                let cols: Vec<String> = fields
                    .iter()
                    .map(|f| match s.fields.iter().find(|(g, _)| g == f) {
                        Some((_, c)) => format!("r.{} as {}", quote_ident(c), quote_ident(f)),
                        None => format!("null as {}", quote_ident(f)),
                    })
                    .collect();
                let updated = match &s.updated_at {
                    Some(u) => format!("cast(r.{} as timestamp)", quote_ident(u)),
                    None => "cast(null as timestamp)".to_string(),
                };
                format!(
                    "    select m.{id}, '{name}' as _source, {rank} as _source_rank, m.source_id as _source_id, {updated} as _updated_at, {cols}\n    \
                     from {table} r\n    join {map} m on m.source = '{name}' and m.source_id = cast(r.{rid} as varchar)",
                    name = s.name.replace('\'', "''"),
                    cols = cols.join(", "),
                    table = quote_ident(&s.table),
                    map = quote_ident(&self.map_table),
                    rid = quote_ident(&s.id),
                )
            })
            .collect();
        records.join("\n    union all\n")
    }

    /// The SQL of the golden records from `records` (as [`Identity::records_sql`] gives them):
    /// one row per id, each field picked by its survivorship rule.
    pub fn golden_select(&self, records: &str) -> String {
        let fields = self.golden_fields();
        let id = quote_ident(&self.id_column);
        let picks: Vec<String> = fields
            .iter()
            .map(|f| {
                let q = quote_ident(f);
                let rule = self
                    .survivorship
                    .iter()
                    .find(|(g, _)| g == f)
                    .map(|(_, s)| s.clone())
                    .unwrap_or(Survivorship::Prefer(Vec::new()));
                match rule {
                    Survivorship::Prefer(order) => {
                        let rank = self.preference_rank(&order);
                        format!("    first_value({q} order by {rank}, _source_id) filter (where {q} is not null) as {q}")
                    }
                    Survivorship::MostRecent => format!(
                        "    first_value({q} order by _updated_at desc nulls last, _source_rank, _source_id) filter (where {q} is not null) as {q}"
                    ),
                    Survivorship::Max => format!("    max({q}) as {q}"),
                    Survivorship::Min => format!("    min({q}) as {q}"),
                }
            })
            .collect();
        format!(
            "select\n    {id},\n{},\n    count(*) as record_count,\n    \
             array_to_string(array_sort(array_distinct(array_agg(_source))), ',') as sources\nfrom {records}\ngroup by {id}",
            picks.join(",\n")
        )
    }

    /// A SQL expression ranking a record by a source preference list (unlisted sources last, in
    /// declaration order).
    pub(super) fn preference_rank(&self, order: &[String]) -> String {
        if order.is_empty() {
            return "_source_rank".to_string();
        }
        let mut case = String::from("case _source");
        for (i, s) in order.iter().enumerate() {
            case.push_str(&format!(" when '{}' then {i}", s.replace('\'', "''")));
        }
        case.push_str(&format!(" else {} + _source_rank end", order.len()));
        case
    }
}
