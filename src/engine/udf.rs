//! kbcrm's SQL functions, registered in every session: the BG/NBD and Gamma-Gamma models as
//! scalar functions and fitting aggregates, and the run parameters (`kbcrm_as_of()`,
//! `kbcrm_var('name')`).
//!
//! ```sql
//! with fit as (select bgnbd_fit(frequency, recency_weeks, age_weeks) as p from cube_customer_rfm)
//! select customer_id,
//!        bgnbd_p_alive(frequency, recency_weeks, age_weeks, p['r'], p['alpha'], p['a'], p['b'])
//! from cube_customer_rfm cross join fit
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Float64Builder, ListArray};
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Float64Type};
use datafusion::common::{Result as DfResult, ScalarValue, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, ScalarFunctionArgs, ScalarUDF,
    ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::SessionContext;

use crate::cubes::models::bgnbd::{BgNbd, Rft};
use crate::cubes::models::gamma_gamma::{GammaGamma, Spend};

/// Run parameters visible to SQL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RunParams {
    /// The as-of date (`kbcrm_as_of()`), days since the epoch.
    pub as_of_days: i32,
    /// Pipeline variables (`kbcrm_var('name')`), as text.
    pub vars: BTreeMap<String, String>,
}

/// What a model's result depends on besides its inputs: its SQL and the run parameters it reads.
pub fn sql_definition(sql: &str, params: &RunParams) -> String {
    let mut d = sql.to_string();
    if sql.contains("kbcrm_as_of") {
        d.push_str(&format!("\n-- as of {}", params.as_of_days));
    }
    if sql.contains("kbcrm_var") {
        d.push_str(&format!("\n-- vars {:?}", params.vars));
    }
    d
}

/// A model's whole definition: its SQL with the run parameters it reads, and the order its
/// files are written in.
pub fn model_definition(model: &crate::plan::Model, params: &RunParams) -> String {
    let mut d = sql_definition(&model.sql, params);
    if !model.cluster_by.is_empty() {
        d.push_str(&format!("\n-- cluster by {}", model.cluster_by.join(", ")));
    }
    if let Some(files_by) = &model.files_by {
        d.push_str(&format!("\n-- files by {files_by}"));
    }
    d
}

/// Register every kbcrm function in `ctx`.
pub fn register(ctx: &SessionContext, params: &RunParams) {
    for f in NUMERIC {
        ctx.register_udf(ScalarUDF::from(NumericUdf::new(f)));
    }
    ctx.register_udaf(AggregateUDF::from(FitUdaf::new(FitKind::BgNbd)));
    ctx.register_udaf(AggregateUDF::from(FitUdaf::new(FitKind::GammaGamma)));
    ctx.register_udf(ScalarUDF::from(TopReasons {
        signature: Signature::variadic_any(Volatility::Immutable),
    }));
    ctx.register_udf(ScalarUDF::from(AsOf {
        days: params.as_of_days,
        signature: Signature::exact(vec![], Volatility::Stable),
    }));
    ctx.register_udf(ScalarUDF::from(Var {
        vars: params.vars.clone(),
        signature: Signature::exact(vec![DataType::Utf8], Volatility::Stable),
    }));
}

/// A numeric function of doubles; identified by its name.
#[derive(Debug, Clone, Copy)]
struct NumericFn {
    name: &'static str,
    /// Its arguments' names, in order (shown by an error for a wrong call).
    params: &'static [&'static str],
    f: fn(&[f64]) -> f64,
}

impl PartialEq for NumericFn {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for NumericFn {}

impl std::hash::Hash for NumericFn {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.name.hash(state);
    }
}

const NUMERIC: &[NumericFn] = &[
    NumericFn {
        name: "bgnbd_p_alive",
        params: &["x", "t_x", "t", "r", "alpha", "a", "b"],
        f: |v| bgnbd(v, 3).p_alive(&rft(v)),
    },
    NumericFn {
        name: "bgnbd_expected_purchases",
        params: &["x", "t_x", "t", "horizon", "r", "alpha", "a", "b"],
        f: |v| bgnbd(v, 4).expected_purchases(&rft(v), v[3]),
    },
    NumericFn {
        name: "bgnbd_discounted_purchases",
        // `rate`: the discount rate per period.
        params: &[
            "x", "t_x", "t", "horizon", "periods", "rate", "r", "alpha", "a", "b",
        ],
        f: |v| discounted(&bgnbd(v, 6), &rft(v), v[3], v[4], v[5]),
    },
    NumericFn {
        name: "gg_expected_spend",
        params: &["x", "m", "p", "q", "gamma"],
        f: |v| {
            GammaGamma {
                p: v[2],
                q: v[3],
                gamma: v[4],
            }
            .expected_spend(&Spend { x: v[0], m: v[1] })
        },
    },
];

/// A signature whose arguments have names, which an error for a wrong call lists
/// (`bgnbd_p_alive(x: Float64, t_x: Float64, ...)`); unnamed if the names do not fit it.
fn named(signature: Signature, params: &[&str]) -> Signature {
    signature
        .clone()
        .with_parameter_names(params.to_vec())
        .unwrap_or(signature)
}

fn rft(v: &[f64]) -> Rft {
    Rft {
        x: v[0],
        t_x: v[1],
        t: v[2],
    }
}

fn bgnbd(v: &[f64], at: usize) -> BgNbd {
    BgNbd {
        r: v[at],
        alpha: v[at + 1],
        a: v[at + 2],
        b: v[at + 3],
    }
}

/// Expected purchases over `horizon` split into `periods` equal periods, each discounted at
/// `rate` per period: Σ_k (E[Y(k·h/n)] − E[Y((k−1)·h/n)]) / (1 + rate)^k.
fn discounted(m: &BgNbd, c: &Rft, horizon: f64, periods: f64, rate: f64) -> f64 {
    let n = periods.max(1.0) as usize;
    let step = horizon / n as f64;
    let mut prev = 0.0;
    let mut total = 0.0;
    for k in 1..=n {
        let e = m.expected_purchases(c, step * k as f64);
        total += (e - prev) / (1.0 + rate).powi(k as i32);
        prev = e;
    }
    total
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct NumericUdf {
    f: NumericFn,
    signature: Signature,
}

impl NumericUdf {
    fn new(f: &NumericFn) -> Self {
        NumericUdf {
            f: *f,
            signature: named(
                Signature::uniform(
                    f.params.len(),
                    vec![DataType::Float64],
                    Volatility::Immutable,
                ),
                f.params,
            ),
        }
    }
}

impl ScalarUDFImpl for NumericUdf {
    fn name(&self) -> &str {
        self.f.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let cols: Vec<&Float64Array> = arrays
            .iter()
            .map(|a| a.as_primitive::<Float64Type>())
            .collect();
        let mut out = Float64Builder::with_capacity(args.number_rows);
        let mut v = vec![0.0; self.f.params.len()];
        for row in 0..args.number_rows {
            if cols.iter().any(|c| c.is_null(row)) {
                out.append_null();
                continue;
            }
            for (slot, c) in v.iter_mut().zip(&cols) {
                *slot = c.value(row);
            }
            let r = (self.f.f)(&v);
            if r.is_finite() {
                out.append_value(r)
            } else {
                out.append_null()
            }
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// `kbcrm_as_of()`: the run's as-of date.
#[derive(Debug, PartialEq, Eq, Hash)]
struct AsOf {
    days: i32,
    signature: Signature,
}

impl ScalarUDFImpl for AsOf {
    fn name(&self) -> &str {
        "kbcrm_as_of"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Date32)
    }

    fn invoke_with_args(&self, _: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        Ok(ColumnarValue::Scalar(ScalarValue::Date32(Some(self.days))))
    }
}

/// `kbcrm_var('name')`: a pipeline variable as text.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Var {
    vars: BTreeMap<String, String>,
    signature: Signature,
}

impl ScalarUDFImpl for Var {
    fn name(&self) -> &str {
        "kbcrm_var"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let name = match args.args.first() {
            Some(ColumnarValue::Scalar(
                ScalarValue::Utf8(Some(n)) | ScalarValue::Utf8View(Some(n)),
            )) => n.clone(),
            _ => return exec_err!("kbcrm_var takes one literal name, e.g. kbcrm_var('churn_red')"),
        };
        match self.vars.get(&name) {
            Some(v) => Ok(ColumnarValue::Scalar(ScalarValue::Utf8(Some(v.clone())))),
            None => {
                let known: Vec<&str> = self.vars.keys().map(String::as_str).collect();
                exec_err!(
                    "kbcrm_var('{name}'): the pipeline declares no variable '{name}' under `vars:`; it has: {}",
                    known.join(", ")
                )
            }
        }
    }
}

/// `kbcrm_top_reasons(n, min_score, score1, text1, score2, text2, ...)`: the texts of the `n`
/// highest scores at or above `min_score`, highest first, joined by "; ".
#[derive(Debug, PartialEq, Eq, Hash)]
struct TopReasons {
    signature: Signature,
}

impl ScalarUDFImpl for TopReasons {
    fn name(&self) -> &str {
        "kbcrm_top_reasons"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        if arg_types.len() < 4 || !arg_types.len().is_multiple_of(2) {
            return datafusion::common::plan_err!(
                "kbcrm_top_reasons(n, min_score, score1, text1, ...) takes two numbers and then pairs of score and text"
            );
        }
        Ok(DataType::Utf8)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays = ColumnarValue::values_to_arrays(&args.args)?;
        let num = |a: &ArrayRef| arrow::compute::cast(a, &DataType::Float64);
        let text = |a: &ArrayRef| arrow::compute::cast(a, &DataType::Utf8);
        let n = num(&arrays[0])?;
        let min = num(&arrays[1])?;
        let pairs: Vec<(ArrayRef, ArrayRef)> = arrays[2..]
            .chunks(2)
            .map(|p| Ok((num(&p[0])?, text(&p[1])?)))
            .collect::<DfResult<_>>()?;
        let (n, min) = (
            n.as_primitive::<Float64Type>(),
            min.as_primitive::<Float64Type>(),
        );
        let mut out = arrow::array::StringBuilder::new();
        for row in 0..args.number_rows {
            let mut found: Vec<(f64, &str)> = pairs
                .iter()
                .filter_map(|(s, t)| {
                    let (s, t) = (s.as_primitive::<Float64Type>(), t.as_string::<i32>());
                    (s.is_valid(row) && t.is_valid(row) && s.value(row) >= min.value(row))
                        .then(|| (s.value(row), t.value(row)))
                })
                .collect();
            found.sort_by(|a, b| b.0.total_cmp(&a.0));
            let keep = n.value(row).max(0.0) as usize;
            let texts: Vec<&str> = found.into_iter().take(keep).map(|(_, t)| t).collect();
            out.append_value(texts.join("; "));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// Which model a fitting aggregate fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum FitKind {
    BgNbd,
    GammaGamma,
}

impl FitKind {
    fn name(&self) -> &'static str {
        match self {
            FitKind::BgNbd => "bgnbd_fit",
            FitKind::GammaGamma => "gg_fit",
        }
    }

    fn inputs(&self) -> &'static [&'static str] {
        match self {
            FitKind::BgNbd => &["x", "t_x", "t"],
            FitKind::GammaGamma => &["x", "m"],
        }
    }

    fn outputs(&self) -> &'static [&'static str] {
        match self {
            FitKind::BgNbd => &["r", "alpha", "a", "b", "log_likelihood", "customers"],
            FitKind::GammaGamma => &["p", "q", "gamma", "log_likelihood", "customers"],
        }
    }

    fn fields(&self) -> Fields {
        self.outputs()
            .iter()
            .map(|n| Field::new(*n, DataType::Float64, true))
            .collect()
    }

    /// Fit the collected columns; `None` when there is nothing to fit or the fit fails.
    fn fit(&self, cols: &[Vec<f64>]) -> Option<Vec<f64>> {
        match self {
            FitKind::BgNbd => {
                let data: Vec<Rft> = (0..cols[0].len())
                    .map(|i| Rft {
                        x: cols[0][i],
                        t_x: cols[1][i],
                        t: cols[2][i],
                    })
                    .collect();
                let f = BgNbd::fit(&data)?;
                let p = f.params;
                Some(vec![
                    p.r,
                    p.alpha,
                    p.a,
                    p.b,
                    f.log_likelihood,
                    f.customers as f64,
                ])
            }
            FitKind::GammaGamma => {
                let data: Vec<Spend> = (0..cols[0].len())
                    .map(|i| Spend {
                        x: cols[0][i],
                        m: cols[1][i],
                    })
                    .collect();
                let f = GammaGamma::fit(&data)?;
                let p = f.params;
                Some(vec![
                    p.p,
                    p.q,
                    p.gamma,
                    f.log_likelihood,
                    f.customers as f64,
                ])
            }
        }
    }
}

/// `bgnbd_fit(x, t_x, t)` and `gg_fit(x, m)`: maximum-likelihood fits as aggregates returning a
/// struct of the parameters, the log-likelihood and the number of customers fitted.
#[derive(Debug, PartialEq, Eq, Hash)]
struct FitUdaf {
    kind: FitKind,
    signature: Signature,
}

impl FitUdaf {
    fn new(kind: FitKind) -> Self {
        FitUdaf {
            kind,
            signature: named(
                Signature::uniform(
                    kind.inputs().len(),
                    vec![DataType::Float64],
                    Volatility::Immutable,
                ),
                kind.inputs(),
            ),
        }
    }
}

impl AggregateUDFImpl for FitUdaf {
    fn name(&self) -> &str {
        self.kind.name()
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Struct(self.kind.fields()))
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(FitAccumulator {
            kind: self.kind,
            cols: vec![Vec::new(); self.kind.inputs().len()],
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok(self
            .kind
            .inputs()
            .iter()
            .map(|n| {
                Arc::new(Field::new(
                    format!("{}[{n}]", args.name),
                    DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true))),
                    true,
                ))
            })
            .collect())
    }
}

#[derive(Debug)]
struct FitAccumulator {
    kind: FitKind,
    cols: Vec<Vec<f64>>,
}

impl Accumulator for FitAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let cols: Vec<&Float64Array> = values
            .iter()
            .map(|a| a.as_primitive::<Float64Type>())
            .collect();
        for row in 0..values.first().map_or(0, |a| a.len()) {
            if cols.iter().any(|c| c.is_null(row)) {
                continue;
            }
            for (dst, c) in self.cols.iter_mut().zip(&cols) {
                dst.push(c.value(row));
            }
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        let fields = self.kind.fields();
        let values = self.kind.fit(&self.cols);
        let arrays: Vec<ArrayRef> = (0..fields.len())
            .map(|i| Arc::new(Float64Array::from(vec![values.as_ref().map(|v| v[i])])) as ArrayRef)
            .collect();
        let array = arrow::array::StructArray::try_new(fields, arrays, None)?;
        Ok(ScalarValue::Struct(Arc::new(array)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.cols.iter().map(|c| c.capacity() * 8).sum::<usize>()
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok(self
            .cols
            .iter()
            .map(|c| {
                ScalarValue::List(Arc::new(
                    ListArray::from_iter_primitive::<Float64Type, _, _>(vec![Some(
                        c.iter().map(|v| Some(*v)).collect::<Vec<_>>(),
                    )]),
                ))
            })
            .collect())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        for (dst, state) in self.cols.iter_mut().zip(states) {
            let lists = state.as_list::<i32>();
            for i in 0..lists.len() {
                if lists.is_valid(i) {
                    let values = lists.value(i);
                    dst.extend(values.as_primitive::<Float64Type>().iter().flatten());
                }
            }
        }
        Ok(())
    }
}

/// `hash(value) % slices` as UInt64: which of `slices` slices a row with `value` belongs to
/// (equal values, of the same type, in the same slice). Used to build a model a slice of its
/// join key at a time; not registered as an SQL function.
pub(crate) fn slice_of(value: datafusion::prelude::Expr, slices: u64) -> datafusion::prelude::Expr {
    let udf = ScalarUDF::from(SliceOf {
        slices: slices.max(1),
        signature: Signature::any(1, Volatility::Immutable),
    });
    udf.call(vec![value])
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct SliceOf {
    slices: u64,
    signature: Signature,
}

impl ScalarUDFImpl for SliceOf {
    fn name(&self) -> &str {
        "kbcrm_slice_of"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let [value] = args.args.as_slice() else {
            return exec_err!("kbcrm_slice_of takes one value");
        };
        let array = value.to_array(args.number_rows)?;
        // Text hashes alike whichever of Arrow's string types holds it.
        let array = match array.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 => {
                arrow::compute::cast(&array, &DataType::Utf8View)?
            }
            _ => array,
        };
        let state = datafusion::common::hash_utils::RandomState::with_seed(0);
        let slices = self.slices;
        datafusion::common::hash_utils::with_hashes([&array], &state, |hashes| {
            let out: arrow::array::UInt64Array = hashes.iter().map(|h| Some(h % slices)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        })
    }
}
