//! `kbcrm user add`: write a user's SCRAM-SHA-256 verifier into kbcrm.yaml, keeping the rest
//! of the file (comments, order) as it is.

use std::path::Path;

use crate::config::{ProjectSpec, parse_yaml};
use crate::error::{Error, Result};
use crate::plan::{PROJECT_FILE, Project};

/// Add a user, or replace the password and role of an existing one.
pub fn add_user(project: &Project, name: &str, role: &str, password: &str) -> Result<()> {
    let valid = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !valid {
        return Err(Error::Usage(format!(
            "'{name}' is not a user name; use letters, digits, '_', '-' and '.', starting with a letter"
        )));
    }
    if !project.access.roles.contains_key(role) {
        let known: Vec<&str> = project.access.roles.keys().map(String::as_str).collect();
        return Err(Error::Usage(format!(
            "no role '{role}' under roles: in {PROJECT_FILE} (declared: {}); declare it first",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    if password.is_empty() {
        return Err(Error::Usage(
            "the password is empty; give a password".into(),
        ));
    }
    let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    let file = project.root.join(PROJECT_FILE);
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
    let entry = format!("{name}: {{ role: {role}, scram: \"{verifier}\" }}");
    let updated = with_user(&text, name, &entry);
    // Never write a file that no longer loads.
    let updated = std::sync::Arc::new(updated);
    parse_yaml::<ProjectSpec>(Path::new(PROJECT_FILE), &updated).map_err(Error::Invalid)?;
    let tmp = file.with_extension("yaml.tmp");
    std::fs::write(&tmp, updated.as_bytes()).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &file).map_err(|e| Error::io(&file, e))?;
    Ok(())
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The file with `entry` (one line, `name: {...}`) under the top-level `users:` key.
fn with_user(text: &str, name: &str, entry: &str) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let top = lines.iter().position(|l| {
        let t = l.trim_end();
        t == "users:" || t.starts_with("users: #") || t == "users: {}"
    });
    let Some(top) = top else {
        if lines.last().is_some_and(|l| !l.trim().is_empty()) {
            lines.push(String::new());
        }
        lines.push("# Users of `kbcrm serve` (written by `kbcrm user add`).".into());
        lines.push("users:".into());
        lines.push(format!("  {entry}"));
        return lines.join("\n") + "\n";
    };
    lines[top] = "users:".into();
    // The block: following lines that are blank, comments or indented.
    let mut end = top + 1;
    while end < lines.len() {
        let l = &lines[end];
        if !l.trim().is_empty() && indent(l) == 0 && !l.trim_start().starts_with('#') {
            break;
        }
        end += 1;
    }
    let child_indent = lines[top + 1..end]
        .iter()
        .find(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| indent(l))
        .unwrap_or(2);
    let pad = " ".repeat(child_indent);
    let key = format!("{name}:");
    let existing = (top + 1..end)
        .find(|&i| indent(&lines[i]) == child_indent && lines[i].trim_start().starts_with(&key));
    match existing {
        Some(i) => {
            let mut j = i + 1;
            while j < end && (lines[j].trim().is_empty() || indent(&lines[j]) > child_indent) {
                j += 1;
            }
            lines.splice(i..j, [format!("{pad}{entry}")]);
        }
        None => {
            let mut at = end;
            while at > top + 1 && lines[at - 1].trim().is_empty() {
                at -= 1;
            }
            lines.insert(at, format!("{pad}{entry}"));
        }
    }
    lines.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::with_user;

    #[test]
    fn adds_and_replaces_entries_in_place() {
        let text =
            "name: x\n# keep me\nusers:\n  bob: { role: a, scram: \"old\" }\n\nroles:\n  a: {}\n";
        let out = with_user(text, "amy", "amy: { role: a, scram: \"v\" }");
        assert_eq!(
            out,
            "name: x\n# keep me\nusers:\n  bob: { role: a, scram: \"old\" }\n  amy: { role: a, scram: \"v\" }\n\nroles:\n  a: {}\n"
        );
        let out = with_user(&out, "bob", "bob: { role: a, scram: \"new\" }");
        assert!(out.contains("  bob: { role: a, scram: \"new\" }\n  amy:"));
        assert!(!out.contains("old"));
        let fresh = with_user("name: x\n", "amy", "amy: {}");
        assert!(fresh.ends_with("users:\n  amy: {}\n"));
    }
}
