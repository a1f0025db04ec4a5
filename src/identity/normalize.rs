//! Normalising identity fields so that spellings of one value compare equal.

use crate::plan::Normalizer;

/// Legal forms and filler words dropped from names before matching.
const NAME_NOISE: &[&str] = &[
    "gmbh", "ag", "kg", "co", "ohg", "ek", "ug", "mbh", "se", "ltd", "inc", "llc", "plc", "sa",
    "sarl", "bv", "nv", "srl", "spa", "the", "und", "and",
];

/// Normalise `value` with `how`; `None` when nothing usable is left.
pub fn normalize(how: Normalizer, value: &str, default_cc: &str) -> Option<String> {
    let out = match how {
        Normalizer::Email => email(value),
        Normalizer::Phone => phone(value, default_cc),
        Normalizer::TaxId => tax_id(value),
        Normalizer::Name => name(value),
        Normalizer::Text => Some(value.trim().to_lowercase()),
    }?;
    (!out.is_empty()).then_some(out)
}

fn email(v: &str) -> Option<String> {
    let e = v.trim().to_lowercase();
    let (local, domain) = e.split_once('@')?;
    (!local.is_empty() && domain.contains('.') && !e.contains(char::is_whitespace)).then_some(e)
}

/// E.164: `+` and 8 to 15 digits. `00` becomes `+`; a national number (leading 0) gets the
/// default country code.
fn phone(v: &str, default_cc: &str) -> Option<String> {
    let t = v.trim();
    let plus = t.starts_with('+');
    let digits: String = t.chars().filter(char::is_ascii_digit).collect();
    let full = if plus {
        digits
    } else if let Some(rest) = digits.strip_prefix("00") {
        rest.to_string()
    } else if let Some(rest) = digits.strip_prefix('0') {
        format!("{default_cc}{rest}")
    } else {
        format!("{default_cc}{digits}")
    };
    (8..=15).contains(&full.len()).then(|| format!("+{full}"))
}

fn tax_id(v: &str) -> Option<String> {
    Some(
        v.chars()
            .filter(char::is_ascii_alphanumeric)
            .collect::<String>()
            .to_uppercase(),
    )
}

fn fold(c: char) -> &'static str {
    match c {
        'ä' | 'æ' => "ae",
        'ö' | 'ø' | 'œ' => "oe",
        'ü' => "ue",
        'ß' => "ss",
        'á' | 'à' | 'â' | 'ã' | 'å' => "a",
        'é' | 'è' | 'ê' | 'ë' => "e",
        'í' | 'ì' | 'î' | 'ï' => "i",
        'ó' | 'ò' | 'ô' | 'õ' => "o",
        'ú' | 'ù' | 'û' => "u",
        'ç' => "c",
        'ñ' => "n",
        _ => "",
    }
}

fn name(v: &str) -> Option<String> {
    let mut s = String::with_capacity(v.len());
    for c in v.to_lowercase().chars() {
        let f = fold(c);
        if !f.is_empty() {
            s.push_str(f);
        } else if c.is_alphanumeric() {
            s.push(c);
        } else {
            s.push(' ');
        }
    }
    let words: Vec<&str> = s
        .split_whitespace()
        .filter(|w| !NAME_NOISE.contains(w))
        .collect();
    Some(words.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_each_kind() {
        let n = |h, v| normalize(h, v, "49");
        assert_eq!(
            n(Normalizer::Email, "  Anna.Schmidt@Mail.DE "),
            Some("anna.schmidt@mail.de".into())
        );
        assert_eq!(n(Normalizer::Email, "not an email"), None);
        for p in [
            "+49 151 2345678",
            "0151 2345678",
            "0049 151-2345678",
            "(0151) 234 5678",
            "+491512345678",
        ] {
            assert_eq!(n(Normalizer::Phone, p), Some("+491512345678".into()), "{p}");
        }
        assert_eq!(n(Normalizer::Phone, "12"), None);
        assert_eq!(
            n(Normalizer::TaxId, "DE-123.456.789"),
            Some("DE123456789".into())
        );
        assert_eq!(
            n(Normalizer::TaxId, "de 123 456 789"),
            Some("DE123456789".into())
        );
        assert_eq!(
            n(Normalizer::Name, "Müller Bau GmbH & Co. KG"),
            Some("mueller bau".into())
        );
        assert_eq!(n(Normalizer::Name, "GmbH"), None);
    }
}
