//! RFC 3339 text for wall-clock times, always in UTC (`2026-12-01T10:20:30Z`).
//!
//! Written here rather than taken from a date crate: the daemon needs exactly one
//! format, and the conversion is Howard Hinnant's `days_from_civil` /
//! `civil_from_days`, a few lines that the tests pin down. Times before 1970 are
//! printed as 1970-01-01T00:00:00Z (a clock that far off is broken anyway).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds precision, as the CLI prints it: `2026-12-01T10:20:30Z`.
pub fn format(time: SystemTime) -> String {
    let since = since_epoch(time);
    format!("{}Z", date_time(since.as_secs()))
}

/// Nanosecond precision when there is a fraction (`2026-12-01T10:20:30.000000123Z`),
/// for files whose order must survive a round trip.
pub fn format_precise(time: SystemTime) -> String {
    let since = since_epoch(time);
    match since.subsec_nanos() {
        0 => format!("{}Z", date_time(since.as_secs())),
        nanos => format!("{}.{nanos:09}Z", date_time(since.as_secs())),
    }
}

/// Parses what `format` and `format_precise` write: UTC (`Z`) only, an optional
/// fraction of 1 to 9 digits.
pub fn parse(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let (time, fraction) = match time.split_once('.') {
        Some((time, fraction)) => (time, Some(fraction)),
        None => (time, None),
    };
    let [year, month, day] = fields::<3>(date, '-', &[4, 2, 2])?;
    let [hour, minute, second] = fields::<3>(time, ':', &[2, 2, 2])?;
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let nanos = match fraction {
        None => 0,
        Some(f) if (1..=9).contains(&f.len()) && f.bytes().all(|b| b.is_ascii_digit()) => {
            f.parse::<u32>().ok()? * 10u32.pow(9 - f.len() as u32)
        }
        Some(_) => return None,
    };
    let days = days_from_civil(year, month, day);
    let seconds = u64::try_from(days).ok()? * 86_400 + hour * 3600 + minute * 60 + second;
    UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

fn since_epoch(time: SystemTime) -> Duration {
    time.duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// `YYYY-MM-DDTHH:MM:SS` of seconds since the epoch.
fn date_time(seconds: u64) -> String {
    let days = (seconds / 86_400) as i64;
    let of_day = seconds % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        of_day / 3600,
        of_day / 60 % 60,
        of_day % 60
    )
}

/// Fixed-width decimal fields separated by `sep`.
fn fields<const N: usize>(text: &str, sep: char, widths: &[usize; N]) -> Option<[u64; N]> {
    let mut out = [0; N];
    let mut parts = text.split(sep);
    for (slot, width) in out.iter_mut().zip(widths) {
        let part = parts.next()?;
        if part.len() != *width || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *slot = part.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

fn days_in_month(year: u64, month: u64) -> u64 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant).
fn days_from_civil(year: u64, month: u64, day: u64) -> i64 {
    let y = year as i64 - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = month as i64;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The date of a day count since 1970-01-01 (Hinnant).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: u64, nanos: u32) -> SystemTime {
        UNIX_EPOCH + Duration::new(seconds, nanos)
    }

    #[test]
    fn known_instants() {
        // Checked against `date -u -d @<seconds> +%FT%TZ`.
        let cases = [
            (0, "1970-01-01T00:00:00Z"),
            (951_782_400, "2000-02-29T00:00:00Z"),
            (1_709_251_199, "2024-02-29T23:59:59Z"),
            (1_796_120_430, "2026-12-01T10:20:30Z"),
            (4_102_444_800, "2100-01-01T00:00:00Z"),
            (253_402_300_799, "9999-12-31T23:59:59Z"),
        ];
        for (seconds, text) in cases {
            assert_eq!(format(at(seconds, 0)), text);
            assert_eq!(parse(text), Some(at(seconds, 0)), "{text}");
        }
        assert_eq!(format(UNIX_EPOCH - Duration::from_secs(5)), cases[0].1);
    }

    #[test]
    fn every_day_of_four_centuries_round_trips() {
        let mut previous = None;
        for day in 0..146_097 * 2 {
            let time = at(day * 86_400 + 86_399, 0);
            let text = format(time);
            assert_eq!(parse(&text), Some(time), "{text}");
            assert!(previous.as_ref() < Some(&text), "text sorts like time");
            previous = Some(text);
        }
    }

    #[test]
    fn precise_text_keeps_nanoseconds() {
        let time = at(1_796_120_430, 123_456_789);
        assert_eq!(format(time), "2026-12-01T10:20:30Z");
        assert_eq!(format_precise(time), "2026-12-01T10:20:30.123456789Z");
        assert_eq!(parse(&format_precise(time)), Some(time));
        assert_eq!(format_precise(at(7, 0)), "1970-01-01T00:00:07Z");
        assert_eq!(
            parse("2026-12-01T10:20:30.5Z"),
            Some(at(1_796_120_430, 500_000_000))
        );
    }

    #[test]
    fn anything_else_is_refused() {
        for text in [
            "",
            "2026-12-01T10:20:30",
            "2026-12-01T10:20:30+00:00",
            "2026-12-01 10:20:30Z",
            "2026-13-01T10:20:30Z",
            "2026-02-29T10:20:30Z",
            "2026-12-01T24:00:00Z",
            "2026-12-01T10:20:60Z",
            "2026-12-1T10:20:30Z",
            "+026-12-01T10:20:30Z",
            "2026-12-01T10:20:30.Z",
            "2026-12-01T10:20:30.1234567890Z",
            "2026-12-01T10:20:30.-1Z",
            "2026-12-01T10:20:30:00Z",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }
}
