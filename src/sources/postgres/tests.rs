use super::*;

fn numeric(weight: i16, sign: u16, dscale: u16, digits: &[i16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend((digits.len() as i16).to_be_bytes());
    v.extend(weight.to_be_bytes());
    v.extend(sign.to_be_bytes());
    v.extend(dscale.to_be_bytes());
    for d in digits {
        v.extend(d.to_be_bytes());
    }
    v
}

#[test]
fn numerics_scale_and_round() {
    // 12345.678 = [1, 2345, 6780] weight 1
    let n = numeric(1, 0, 3, &[1, 2345, 6780]);
    assert_eq!(numeric_to_i128(&n, 2).unwrap(), Some(1_234_568));
    assert_eq!(numeric_to_i128(&n, 3).unwrap(), Some(12_345_678));
    assert_eq!(numeric_to_i128(&n, 0).unwrap(), Some(12_346));
    let neg = numeric(1, 0x4000, 3, &[1, 2345, 6780]);
    assert_eq!(numeric_to_i128(&neg, 2).unwrap(), Some(-1_234_568));
    // 0.05 = [500] weight -1
    let small = numeric(-1, 0, 2, &[500]);
    assert_eq!(numeric_to_i128(&small, 2).unwrap(), Some(5));
    assert_eq!(numeric_to_i128(&small, 1).unwrap(), Some(1));
    // 0.00004 = [4000] weight -2 -> rounds to 0 at 4 places, 1 at... 0.0000|4
    let tiny = numeric(-2, 0, 5, &[4000]);
    assert_eq!(numeric_to_i128(&tiny, 4).unwrap(), Some(0));
    assert_eq!(numeric_to_i128(&tiny, 5).unwrap(), Some(4));
    // 0.00005 rounds up at 4 places
    let half = numeric(-2, 0, 5, &[5000]);
    assert_eq!(numeric_to_i128(&half, 4).unwrap(), Some(1));
    // 20000 = [2] weight 1
    let round = numeric(1, 0, 0, &[2]);
    assert_eq!(numeric_to_i128(&round, 2).unwrap(), Some(2_000_000));
    // zero: no digits
    assert_eq!(numeric_to_i128(&numeric(0, 0, 0, &[]), 2).unwrap(), Some(0));
    // NaN
    assert_eq!(
        numeric_to_i128(&numeric(0, 0xC000, 0, &[]), 2).unwrap(),
        None
    );
}
