//! Column types a pipeline may declare, and their Arrow equivalents.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arrow::datatypes::{DataType, TimeUnit};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};

/// A declared column type: what the user writes in `type:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    /// UTF-8 text.
    String,
    /// 32-bit integer.
    Int,
    /// 64-bit integer.
    BigInt,
    /// 64-bit float.
    Double,
    /// Fixed-point decimal with precision and scale.
    Decimal(u8, i8),
    /// true/false.
    Bool,
    /// Calendar date.
    Date,
    /// Point in time, stored as UTC microseconds.
    Timestamp,
    /// A JSON document, validated and stored as text.
    Json,
}

/// Timezone stored with every timestamp column (Delta's `timestamp` type is UTC-adjusted).
pub const UTC: &str = "UTC";

impl ColumnType {
    /// The Arrow type the column is stored as.
    pub fn arrow_type(&self) -> DataType {
        match self {
            ColumnType::String | ColumnType::Json => DataType::Utf8,
            ColumnType::Int => DataType::Int32,
            ColumnType::BigInt => DataType::Int64,
            ColumnType::Double => DataType::Float64,
            ColumnType::Decimal(p, s) => DataType::Decimal128(*p, *s),
            ColumnType::Bool => DataType::Boolean,
            ColumnType::Date => DataType::Date32,
            ColumnType::Timestamp => {
                DataType::Timestamp(TimeUnit::Microsecond, Some(Arc::from(UTC)))
            }
        }
    }
}

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::String => f.write_str("string"),
            ColumnType::Int => f.write_str("int"),
            ColumnType::BigInt => f.write_str("bigint"),
            ColumnType::Double => f.write_str("double"),
            ColumnType::Decimal(p, s) => write!(f, "decimal({p},{s})"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::Json => f.write_str("json"),
        }
    }
}

/// The list shown when a type is not understood.
pub const TYPE_NAMES: &str =
    "string, int, bigint, double, decimal(p,s), bool, date, timestamp, json";

impl FromStr for ColumnType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim().to_ascii_lowercase();
        let simple = match t.as_str() {
            "string" | "text" | "varchar" | "utf8" => Some(ColumnType::String),
            "int" | "integer" | "int32" => Some(ColumnType::Int),
            "bigint" | "long" | "int64" => Some(ColumnType::BigInt),
            "double" | "float" | "float64" => Some(ColumnType::Double),
            "bool" | "boolean" => Some(ColumnType::Bool),
            "date" => Some(ColumnType::Date),
            "timestamp" | "datetime" => Some(ColumnType::Timestamp),
            "json" => Some(ColumnType::Json),
            _ => None,
        };
        if let Some(t) = simple {
            return Ok(t);
        }
        if let Some(args) = t
            .strip_prefix("decimal")
            .or_else(|| t.strip_prefix("numeric"))
            .map(str::trim)
            .and_then(|r| r.strip_prefix('('))
            .and_then(|r| r.strip_suffix(')'))
        {
            let mut parts = args.split(',').map(str::trim);
            let precision = parts.next().and_then(|p| p.parse::<u8>().ok());
            let scale = parts.next().map_or(Some(0), |s| s.parse::<i8>().ok());
            return match (precision, scale, parts.next()) {
                (Some(p @ 1..=38), Some(sc), None) if sc >= 0 && (sc as u8) <= p => {
                    Ok(ColumnType::Decimal(p, sc))
                }
                _ => Err(format!(
                    "'{s}' is not a valid decimal: write decimal(p,s) with 1 <= p <= 38 and 0 <= s <= p"
                )),
            };
        }
        if t.starts_with("decimal(") || t.starts_with("numeric(") {
            return Err(format!(
                "incomplete column type '{s}': inside a {{ ... }} map a comma ends the value; \
                 quote the type, e.g. type: \"decimal(18,2)\""
            ));
        }
        Err(format!(
            "unknown column type '{s}'; expected one of {TYPE_NAMES}"
        ))
    }
}

impl<'de> Deserialize<'de> for ColumnType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl schemars::JsonSchema for ColumnType {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "ColumnType".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "description": format!("one of {TYPE_NAMES}"),
            "pattern": "^(?i)(string|text|varchar|int|integer|bigint|long|double|float|bool|boolean|date|timestamp|datetime|json|(decimal|numeric)\\s*\\(\\s*\\d+\\s*(,\\s*\\d+\\s*)?\\))$"
        })
    }
}

/// A declared column: a type alone (`amount: decimal(18,2)`) or a map with options.
#[derive(Debug, Clone, PartialEq, schemars::JsonSchema)]
#[schemars(untagged)]
pub enum ColumnSpecInput {
    /// Shorthand: just the type.
    Type(ColumnType),
    /// Full form.
    Full(ColumnSpec),
}

/// A declared column in full form.
#[derive(Debug, Clone, PartialEq, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// The column's type.
    #[serde(rename = "type")]
    pub ty: ColumnType,
    /// A row without a value here is rejected to quarantine.
    #[serde(default)]
    pub required: bool,
    /// chrono format for date and timestamp columns, e.g. "%d.%m.%Y %H:%M".
    #[serde(default)]
    pub format: Option<String>,
    /// Name of the field in the source when it differs from the column name.
    #[serde(default)]
    pub source: Option<String>,
    /// Free text for documentation.
    #[serde(default)]
    pub description: Option<String>,
}

impl ColumnSpecInput {
    /// The full form.
    pub fn into_full(self) -> ColumnSpec {
        match self {
            ColumnSpecInput::Type(ty) => ColumnSpec {
                ty,
                required: false,
                format: None,
                source: None,
                description: None,
            },
            ColumnSpecInput::Full(c) => c,
        }
    }
}

impl<'de> Deserialize<'de> for ColumnSpecInput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ColumnSpecInput;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a column type ({TYPE_NAMES}) or a map with `type:` and optional `required:`, `format:`"
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map(ColumnSpecInput::Type).map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                ColumnSpec::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(ColumnSpecInput::Full)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_types() {
        assert_eq!("Decimal(18, 2)".parse(), Ok(ColumnType::Decimal(18, 2)));
        assert_eq!("numeric(10)".parse(), Ok(ColumnType::Decimal(10, 0)));
        assert_eq!("BIGINT".parse(), Ok(ColumnType::BigInt));
        assert!("decimal(2,5)".parse::<ColumnType>().is_err());
        assert!("decimal(40,2)".parse::<ColumnType>().is_err());
        let e = "strnig".parse::<ColumnType>().unwrap_err();
        assert!(e.contains("'strnig'") && e.contains("decimal(p,s)"), "{e}");
    }
}
