//! The PostgreSQL functions clients call that the engine lacks (format, quote_literal,
//! pg_size_pretty, set_config, ...).

use super::*;

/// A function answering `value` whatever its arguments (one or more of any type).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Constant {
    pub(super) name: String,
    pub(super) signature: Signature,
    pub(super) value: ScalarValue,
}

impl ScalarUDFImpl for Constant {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(self.value.data_type())
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> Result<ColumnarValue> {
        Ok(ColumnarValue::Scalar(self.value.clone()))
    }
}

pub(super) fn constant(name: &str, value: ScalarValue) -> ScalarUDF {
    ScalarUDF::new_from_impl(Constant {
        name: name.to_string(),
        signature: Signature::variadic_any(Volatility::Stable),
        value,
    })
}

/// The functions client catalog queries call that the engine lacks, answered as PostgreSQL
/// answers them for a database with no such objects.
pub fn register_functions(ctx: &SessionContext) {
    let yes = ScalarValue::Boolean(Some(true));
    let no_text = ScalarValue::Utf8(None);
    // Every object a client can name here is on the search path.
    for name in [
        "pg_function_is_visible",
        "pg_type_is_visible",
        "pg_conversion_is_visible",
        "pg_operator_is_visible",
        "pg_opclass_is_visible",
        "pg_opfamily_is_visible",
        "pg_ts_config_is_visible",
        "pg_ts_dict_is_visible",
        "pg_ts_parser_is_visible",
        "pg_ts_template_is_visible",
        "pg_statistics_obj_is_visible",
    ] {
        ctx.register_udf(constant(name, yes.clone()));
    }
    // No comments; no definitions of indexes, triggers, rules or views; functions are the
    // engine's own, without SQL signatures to show.
    for name in [
        "obj_description",
        "col_description",
        "shobj_description",
        "pg_get_triggerdef",
        "pg_get_indexdef",
        "pg_get_ruledef",
        "pg_get_viewdef",
        "pg_get_function_result",
        "pg_get_function_arguments",
        "pg_get_function_identity_arguments",
    ] {
        ctx.register_udf(constant(name, no_text.clone()));
    }
    // Default privileges: none granted inside the warehouse (pg_dump reads them as text).
    ctx.register_udf(constant("acldefault", no_text.clone()));
    ctx.register_udf(quote_literal_udf());
    ctx.register_udf(constant(
        "pg_tablespace_location",
        ScalarValue::Utf8(Some(String::new())),
    ));
    // Sizes the warehouse does not keep per table as PostgreSQL does.
    for name in ["pg_table_size", "pg_database_size", "pg_indexes_size"] {
        ctx.register_udf(constant(name, ScalarValue::Int64(None)));
    }
    ctx.register_udf(create_udf(
        "pg_is_in_recovery",
        vec![],
        DataType::Boolean,
        Volatility::Stable,
        Arc::new(|_: &[ColumnarValue]| {
            Ok(ColumnarValue::Scalar(ScalarValue::Boolean(Some(false))))
        }),
    ));
    ctx.register_udf(set_config_udf());
    ctx.register_udf(pg_size_pretty_udf(DataType::Int64));
    ctx.register_udf(ScalarUDF::new_from_impl(Format::new()));
}

/// `format(formatstr, args...)`: `%s` as text, `%I` as a quoted identifier, `%L` as a quoted
/// literal, `%%` a percent sign (positions such as `%1$s` are not supported).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(super) struct Format {
    pub(super) signature: Signature,
}

impl Format {
    pub(super) fn new() -> Self {
        Format {
            signature: Signature::variadic_any(Volatility::Stable),
        }
    }
}

impl ScalarUDFImpl for Format {
    fn name(&self) -> &str {
        "format"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> Result<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        use datafusion::arrow::array::{Array, StringBuilder};
        use datafusion::arrow::util::display::FormatOptions;
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let options = FormatOptions::default();
        let formatters = text_formatters(&arrays, &options)?;
        let mut out = StringBuilder::new();
        for row in 0..args.number_rows {
            if arrays[0].is_null(row) {
                out.append_null();
                continue;
            }
            let text = |i: usize| -> Option<String> {
                (!arrays[i].is_null(row)).then(|| formatters[i].value(row).to_string())
            };
            let template = text(0).unwrap_or_default();
            let mut result = String::new();
            let mut next = 1;
            let mut chars = template.chars();
            while let Some(c) = chars.next() {
                if c != '%' {
                    result.push(c);
                    continue;
                }
                let spec = chars.next();
                if spec == Some('%') {
                    result.push('%');
                    continue;
                }
                if next >= arrays.len() {
                    return Err(DataFusionError::Execution(
                        "too few arguments for format()".into(),
                    ));
                }
                let value = text(next);
                next += 1;
                match (spec, value) {
                    (Some('s'), v) => result.push_str(&v.unwrap_or_default()),
                    (Some('I'), Some(v)) => result.push_str(&pg_quote_ident(&v)),
                    (Some('L'), Some(v)) => result.push_str(&crate::sql::quote_literal(&v)),
                    (Some('L'), None) => result.push_str("NULL"),
                    (Some('I'), None) => {
                        return Err(DataFusionError::Execution(
                            "null values cannot be formatted as an SQL identifier".into(),
                        ));
                    }
                    (other, _) => {
                        return Err(DataFusionError::Execution(format!(
                            "unrecognized format() type specifier \"{}\"",
                            other.map(String::from).unwrap_or_default()
                        )));
                    }
                }
            }
            out.append_value(result);
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// A formatter of each array's values as text.
pub(crate) fn text_formatters<'a>(
    arrays: &'a [datafusion::arrow::array::ArrayRef],
    options: &'a datafusion::arrow::util::display::FormatOptions<'a>,
) -> Result<Vec<datafusion::arrow::util::display::ArrayFormatter<'a>>> {
    arrays
        .iter()
        .map(|a| datafusion::arrow::util::display::ArrayFormatter::try_new(a.as_ref(), options))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Into::into)
}

/// `quote_literal(text)`: the text as a string literal, NULL for NULL.
pub(super) fn quote_literal_udf() -> ScalarUDF {
    use datafusion::arrow::array::{Array, StringArray};
    create_udf(
        "quote_literal",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let texts = arrays[0]
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| DataFusionError::Plan("quote_literal takes text".into()))?;
            let out: StringArray = (0..texts.len())
                .map(|i| (!texts.is_null(i)).then(|| crate::sql::quote_literal(texts.value(i))))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// `set_config(name, value, is_local)`: the value. Settings a client may change go through
/// `SET`; the catalog queries that call this (pg_dump's `search_path`) need only its answer.
pub(super) fn set_config_udf() -> ScalarUDF {
    create_udf(
        "set_config",
        vec![DataType::Utf8, DataType::Utf8, DataType::Boolean],
        DataType::Utf8,
        Volatility::Volatile,
        Arc::new(|args: &[ColumnarValue]| Ok(args[1].clone())),
    )
}

/// `pg_size_pretty(bytes)`: 8192 bytes, 10 kB, 3 MB as PostgreSQL rounds them.
pub(super) fn pg_size_pretty_udf(input: DataType) -> ScalarUDF {
    use datafusion::arrow::array::{Array, Int64Array, StringArray};
    create_udf(
        "pg_size_pretty",
        vec![input],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args: &[ColumnarValue]| {
            let arrays = ColumnarValue::values_to_arrays(args)?;
            let sizes = arrays[0]
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(|| DataFusionError::Plan("pg_size_pretty takes bigint".into()))?;
            let out: StringArray = (0..sizes.len())
                .map(|i| (!sizes.is_null(i)).then(|| size_pretty(sizes.value(i))))
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    )
}

/// PostgreSQL's `pg_size_pretty`: bytes below 10 kB, then the unit that keeps the number
/// under 10240, rounded half up.
pub fn size_pretty(bytes: i64) -> String {
    let mut size = bytes;
    let limit = 10 * 1024;
    let limit2 = limit * 2 - 1;
    if size.abs() < limit {
        return format!("{size} bytes");
    }
    for unit in ["kB", "MB", "GB", "TB"] {
        // Round half up, as PostgreSQL's half_rounded.
        let half = |v: i64| (v + v.signum()) / 2;
        size >>= 9;
        if size.abs() < limit2 || unit == "TB" {
            return format!("{} {unit}", half(size));
        }
        size >>= 1;
    }
    format!("{size} PB")
}

/// An identifier as PostgreSQL's `quote_ident` writes it: bare when it is lower case letters,
/// digits and underscores (not starting with a digit), else double-quoted.
pub(super) fn pg_quote_ident(name: &str) -> String {
    let bare = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if bare {
        name.to_string()
    } else {
        crate::sql::quote_ident(name)
    }
}
