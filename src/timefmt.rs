//! Times as text and as unix numbers: RFC 3339 UTC timestamps
//! (`2030-01-15T12:05:00Z`) for MPP `expires`, receipts, API responses,
//! attestation verdicts and Intel collateral, and the conversions between
//! `SystemTime`, unix milliseconds and unix seconds.
//!
//! Civil-date conversion after H. Hinnant's `days_from_civil` /
//! `civil_from_days` algorithms.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds of `t` (negative before 1970).
pub fn unix_ms(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// Whole unix seconds of unix milliseconds (0 before 1970).
pub fn ms_to_secs(ms: i64) -> u64 {
    u64::try_from(ms.div_euclid(1000)).unwrap_or(0)
}

/// Format unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_rfc3339(unix_secs: u64) -> String {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(i64::MAX);
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// Format unix milliseconds (a store timestamp) as RFC 3339, whole seconds.
pub fn format_rfc3339_ms(unix_ms: i64) -> String {
    format_rfc3339(ms_to_secs(unix_ms))
}

/// Parse `YYYY-MM-DDTHH:MM:SS[.fff]Z` (UTC only; `T` or `t`; a fraction is
/// dropped) to unix seconds. The date must exist (no 30 February); offsets
/// other than `Z` and times before 1970 are refused.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || *b.last()? != b'Z' {
        return None;
    }
    if b[4] != b'-'
        || b[7] != b'-'
        || (b[10] != b'T' && b[10] != b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        part.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let rest = s.get(19..s.len() - 1)?;
    if !rest.is_empty() {
        let frac = rest.strip_prefix('.')?;
        if frac.is_empty() || !frac.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
    }
    // Second 60 is a leap second (RFC 3339 §5.6); it reads as the next
    // minute's first second.
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || se > 60
    {
        return None;
    }
    let t = days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + se;
    u64::try_from(t).ok()
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_unix_seconds() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_751_328_000), "2025-07-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        // The MPP vector's expires and its EIP-3009 validBefore.
        assert_eq!(format_rfc3339(1_894_709_100), "2030-01-15T12:05:00Z");
        assert_eq!(format_rfc3339_ms(1_894_709_100_999), "2030-01-15T12:05:00Z");
        assert_eq!(format_rfc3339_ms(-5), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn parses_utc_timestamps() {
        assert_eq!(parse_rfc3339("2030-01-15T12:05:00Z"), Some(1_894_709_100));
        assert_eq!(parse_rfc3339("2025-07-01T00:00:00Z"), Some(1_751_328_000));
        assert_eq!(parse_rfc3339("2025-07-01t00:00:00Z"), Some(1_751_328_000));
        assert_eq!(
            parse_rfc3339("2026-02-18T00:00:00.123Z"),
            Some(1_771_372_800)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        for bad in [
            "2026-02-18T00:00:00+01:00",
            "2025-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2025-04-31T00:00:00Z",
            "2025-07-01T24:00:00Z",
            "2025-07-01T00:00:00.Z",
            "2025-07-01 00:00:00Z",
            "1969-12-31T23:59:59Z",
            "2025-07-01T00:00:0xZ",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn round_trips() {
        for t in [0, 59, 86_399, 951_782_400, 1_771_372_800, 4_102_444_799] {
            assert_eq!(parse_rfc3339(&format_rfc3339(t)), Some(t));
        }
    }

    #[test]
    fn converts_system_times() {
        let t = UNIX_EPOCH + Duration::from_millis(1_500);
        assert_eq!(unix_ms(t), 1_500);
        assert_eq!(unix_ms(UNIX_EPOCH - Duration::from_millis(20)), -20);
        assert_eq!(ms_to_secs(1_999), 1);
        assert_eq!(ms_to_secs(-1), 0);
    }
}
