//! Checks across files: one producer per table, every table read is built, no cycles; the
//! order of models, identity resolutions and pipelines.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use crate::config::pipeline::TestSpec;
use crate::error::Problem;

use super::loader::{Loader, RawPipeline, yaml_pos};
use super::*;

/// Each built table's (pipeline, file).
type Producers = BTreeMap<String, (String, PathBuf)>;

impl Loader {
    /// Cross-file checks: one producer per table, every read table built somewhere, no cycles.
    /// Orders models and pipelines.
    pub(super) fn check_graph(
        &mut self,
        raw: &[RawPipeline],
        mut pipelines: Vec<Pipeline>,
    ) -> Vec<Pipeline> {
        let (producers, deps) = self.collect_producers(&pipelines);
        self.check_reads(&pipelines, &producers);
        self.check_test_tables(raw, &producers);
        let order = match dag::topo_order(&deps) {
            Ok(o) => o,
            Err(cycle) => {
                self.report_model_cycle(&cycle, &producers);
                return pipelines;
            }
        };
        let rank: HashMap<&str, usize> = order
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        for p in &mut pipelines {
            order_pipeline(p, &rank, &producers);
        }
        self.order_pipelines(&mut pipelines);
        pipelines
    }

    /// The producer of every table and the tables each reads; reports tables built twice.
    fn collect_producers(
        &mut self,
        pipelines: &[Pipeline],
    ) -> (Producers, BTreeMap<String, Vec<String>>) {
        // table -> (pipeline, file)
        let mut producers: Producers = BTreeMap::new();
        let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in pipelines {
            let identity_outputs = p.identities.iter().flat_map(|i| {
                let inputs: Vec<String> = i.sources.iter().map(|s| s.table.clone()).collect();
                let mut golden_inputs = inputs.clone();
                golden_inputs.push(i.map_table.clone());
                [
                    (i.map_table.clone(), p.file.clone(), inputs),
                    (i.golden_table.clone(), p.file.clone(), golden_inputs),
                ]
            });
            let outputs = p
                .sources
                .iter()
                .map(|s| (s.table.clone(), p.file.clone(), Vec::new()))
                .chain(
                    p.models
                        .iter()
                        .map(|m| (m.name.clone(), m.file.clone(), m.depends_on.clone())),
                )
                .chain(identity_outputs)
                .collect::<Vec<_>>();
            for (table, file, d) in outputs {
                if let Some((_, first)) = producers.get(&table) {
                    self.problems.push(
                        Problem::new(
                            &file,
                            format!("table '{table}' is also built by {}", first.display()),
                        )
                        .help("every table has one source or model; rename one of them"),
                    );
                    continue;
                }
                producers.insert(table.clone(), (p.name.clone(), file));
                deps.insert(table, d);
            }
        }
        (producers, deps)
    }

    /// Reports identity record sources and models that read a table nothing builds.
    fn check_reads(&mut self, pipelines: &[Pipeline], producers: &Producers) {
        let names: Vec<&str> = producers.keys().map(String::as_str).collect();
        for p in pipelines {
            for i in &p.identities {
                for s in &i.sources {
                    if !producers.contains_key(&s.table) {
                        self.problems.push(Problem::new(
                            &p.file,
                            format!(
                                "identity '{}': record source '{}' reads table '{}', which no source or model builds",
                                i.entity, s.name, s.table
                            ),
                        ));
                    }
                }
            }
            for m in &p.models {
                for r in self.model_refs.get(&m.name).into_iter().flatten() {
                    if !producers.contains_key(&r.name)
                        && !BUILTIN_TABLES.contains(&r.name.as_str())
                    {
                        let mut prob = Problem::new(
                            &m.file,
                            format!(
                                "model '{}' reads table '{}', which no source or model builds",
                                m.name, r.name
                            ),
                        );
                        if r.position.line > 0 {
                            prob = prob.at(r.position, &m.sql);
                        }
                        prob = prob.help(match closest(&r.name, &names) {
                            Some(c) => format!("did you mean '{c}'?"),
                            None => "add a source or a model that builds it".to_string(),
                        });
                        self.problems.push(prob);
                    }
                }
            }
        }
    }

    /// Reports data tests and relationships tests on tables nothing builds.
    fn check_test_tables(&mut self, raw: &[RawPipeline], producers: &Producers) {
        for (table, file, pos, text) in std::mem::take(&mut self.test_positions) {
            if !table.is_empty() && !producers.contains_key(&table) {
                self.problems.push(
                    Problem::new(
                        &file,
                        format!("data test on table '{table}', which no source or model builds"),
                    )
                    .at(pos, &text),
                );
            }
        }
        for r in raw {
            for t in &r.spec.tests {
                if let TestSpec::Relationships(rel) = &t.value {
                    let target = rel.to.split_once('.').map(|(t, _)| t);
                    match target {
                        Some(tt) if producers.contains_key(tt) => {}
                        _ => self.problems.push(
                            Problem::new(
                                &r.file,
                                format!("relationships test: `to: {}` must name a built table and column as table.column", rel.to),
                            )
                            .at(yaml_pos(&t.referenced, &r.text), &r.text),
                        ),
                    }
                }
            }
        }
    }

    /// Reports a cycle among the tables models build, naming each table's file.
    fn report_model_cycle(&mut self, cycle: &[String], producers: &Producers) {
        let file = producers
            .get(&cycle[0])
            .map(|(_, f)| f.clone())
            .unwrap_or_default();
        let text = cycle
            .iter()
            .map(|t| match producers.get(t) {
                Some((_, f)) => format!("{t} ({})", f.display()),
                None => t.clone(),
            })
            .collect::<Vec<_>>()
            .join(" -> ");
        self.problems.push(
            Problem::new(
                file,
                format!("models depend on each other in a cycle: {text}"),
            )
            .help("a model cannot read, directly or through others, the table it builds"),
        );
    }

    /// Sorts pipelines so each comes after the pipelines whose tables it reads.
    fn order_pipelines(&mut self, pipelines: &mut [Pipeline]) {
        let graph: BTreeMap<String, Vec<String>> = pipelines
            .iter()
            .map(|p| (p.name.clone(), p.depends_on.clone()))
            .collect();
        match dag::topo_order(&graph) {
            Ok(order) => {
                let rank: HashMap<&str, usize> = order
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.as_str(), i))
                    .collect();
                pipelines.sort_by_key(|p| rank.get(p.name.as_str()).copied().unwrap_or(usize::MAX));
            }
            Err(cycle) => self.problems.push(Problem::new(
                "pipelines/",
                format!(
                    "pipelines read each other's tables in a cycle: {}",
                    cycle.join(" -> ")
                ),
            )),
        }
    }
}

/// Orders one pipeline's models and steps by table rank and sets the pipelines it depends on.
fn order_pipeline(p: &mut Pipeline, rank: &HashMap<&str, usize>, producers: &Producers) {
    p.models
        .sort_by_key(|m| rank.get(m.name.as_str()).copied().unwrap_or(usize::MAX));
    let of = |t: &str| rank.get(t).copied().unwrap_or(usize::MAX);
    let mut steps: Vec<(usize, Step)> = p
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| (of(&m.name), Step::Model(i)))
        .chain(
            p.identities
                .iter()
                .enumerate()
                .map(|(i, id)| (of(&id.map_table), Step::Identity(i))),
        )
        .collect();
    steps.sort_by_key(|(r, _)| *r);
    p.steps = steps.into_iter().map(|(_, s)| s).collect();
    let identity_inputs: Vec<String> = p
        .identities
        .iter()
        .flat_map(|i| i.sources.iter().map(|s| s.table.clone()))
        .collect();
    let mut up: Vec<String> = p
        .models
        .iter()
        .flat_map(|m| m.depends_on.iter())
        .chain(identity_inputs.iter())
        .filter_map(|t| producers.get(t).map(|(pl, _)| pl.clone()))
        .filter(|pl| *pl != p.name)
        .collect();
    up.sort();
    up.dedup();
    p.depends_on = up;
}

/// The known name closest to `name`, when it is close enough to be a typo.
fn closest<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (strsim::levenshtein(name, k), *k))
        .filter(|(d, k)| *d <= 2.max(k.len() / 4))
        .min()
        .map(|(_, k)| k)
}
