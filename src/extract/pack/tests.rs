use super::*;

#[test]
fn figures_read_as_people_write_them() {
    assert_eq!(group_digits(3755267.6), "3,755,268");
    assert_eq!(group_digits(-1234.0), "-1,234");
    assert_eq!(group_digits(12.0), "12");
    let f = Figure {
        label: "Revenue".into(),
        kind: FigureKind::Money,
        value: Some(110.0),
        previous: Some(100.0),
        higher_is_better: true,
    };
    assert_eq!(f.show_change().as_deref(), Some("+10 (+10.0%)"));
    let s = Figure {
        kind: FigureKind::Share,
        value: Some(0.42),
        previous: Some(0.45),
        ..f
    };
    assert_eq!(s.show(s.value), "42.0%");
    assert_eq!(s.show_change().as_deref(), Some("-3.0 points"));
    assert_eq!(
        column_kind("revenue_share", &DataType::Float64),
        ColumnKind::Share
    );
    assert_eq!(column_kind("clv", &DataType::Float64), ColumnKind::Money);
    assert_eq!(
        column_kind("customers", &DataType::Int64),
        ColumnKind::Integer
    );
}
