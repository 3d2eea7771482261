//! Duration and size strings, as operators write them in the config file and
//! as the admin API accepts them (`expires_in`, `grace`, `expiring_within`).
//!
//! Both are a whole number followed by a unit, e.g. `30s` or `10MiB`; optional
//! blanks between the number and the unit are allowed. The error strings are
//! whole sentences that quote the input, so a caller only prefixes the field.

use std::time::Duration;

/// Longest duration accepted anywhere: 100 years. Anything longer is surely a
/// typo, and it keeps `now + duration` far from overflowing date arithmetic.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

const DURATION_UNITS: &str = "ms, s, m, h or d";
const SIZE_UNITS: &str = "B, kB, MB, GB, TB, KiB, MiB, GiB, TiB, or a plain number of bytes";

/// Parses `500ms`, `30s`, `5m`, `1h`, `365d` (also `0s`): a whole number and one
/// unit. At most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = |why: &str| format!("invalid duration {s:?}: {why}");
    let (number, unit) = split_number(s).map_err(|why| bad(&why))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "" => {
            return Err(bad(&format!(
                "missing unit (use {DURATION_UNITS}, e.g. 30s)"
            )));
        }
        other => {
            return Err(bad(&format!(
                "unknown unit {other:?} (use {DURATION_UNITS})"
            )));
        }
    };
    let too_long = || bad("too long (at most 36500d)");
    let ms = number.checked_mul(unit_ms).ok_or_else(too_long)?;
    let d = Duration::from_millis(ms);
    if d > MAX_DURATION {
        return Err(too_long());
    }
    Ok(d)
}

/// Parses `10MiB`, `512KiB`, `1GiB`, `100B`, `10MB`, `1kB`, `2GB` or a plain
/// number of bytes. `kB`, `MB`, `GB`, `TB` are decimal (powers of 1000), `KiB`,
/// `MiB`, `GiB`, `TiB` binary (powers of 1024). `KB` is read as `kB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = |why: &str| format!("invalid size {s:?}: {why}");
    let (number, unit) = split_number(s).map_err(|why| bad(&why))?;
    let factor: u64 = match unit {
        "" | "B" => 1,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        other => return Err(bad(&format!("unknown unit {other:?} (use {SIZE_UNITS})"))),
    };
    number.checked_mul(factor).ok_or_else(|| bad("too large"))
}

/// Splits `"  30 s "` into `(30, "s")`. The number must be plain ASCII digits:
/// no sign, no fraction, no exponent.
fn split_number(s: &str) -> Result<(u64, &str), String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("it is empty".into());
    }
    if t.starts_with('-') {
        return Err("it must not be negative".into());
    }
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, rest) = t.split_at(digits_end);
    if digits.is_empty() {
        return Err("it must start with a whole number".into());
    }
    let unit = rest.trim_start();
    if unit.starts_with(['.', ',']) {
        return Err("use a whole number (e.g. 90m instead of 1.5h)".into());
    }
    let number = digits
        .parse::<u64>()
        .map_err(|_| "the number is too large".to_string())?;
    Ok((number, unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(
            parse_duration("365d"),
            Ok(Duration::from_secs(365 * 86_400))
        );
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration(" 10 s "), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
    }

    #[test]
    fn bad_durations_say_why() {
        let cases = [
            ("", "it is empty"),
            ("  ", "it is empty"),
            ("-5s", "must not be negative"),
            ("30", "missing unit"),
            ("1.5h", "whole number"),
            ("5w", "unknown unit \"w\""),
            ("5 sec", "unknown unit \"sec\""),
            ("s", "must start with a whole number"),
            ("+5s", "must start with a whole number"),
            ("1h30m", "unknown unit \"h30m\""),
            ("36501d", "too long"),
            ("99999999999999999999d", "too large"),
            ("18446744073709551615d", "too long"),
        ];
        for (input, why) in cases {
            let err = parse_duration(input).expect_err(input);
            assert!(
                err.starts_with(&format!("invalid duration {input:?}: ")),
                "{err}"
            );
            assert!(err.contains(why), "{input:?}: {err}");
        }
    }

    #[test]
    fn sizes_decimal_binary_and_plain() {
        assert_eq!(parse_size("10MiB"), Ok(10 * 1024 * 1024));
        assert_eq!(parse_size("512KiB"), Ok(512 * 1024));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2TiB"), Ok(2 << 40));
        assert_eq!(parse_size("100B"), Ok(100));
        assert_eq!(parse_size("10MB"), Ok(10_000_000));
        assert_eq!(parse_size("3kB"), Ok(3_000));
        assert_eq!(parse_size("3KB"), Ok(3_000));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("64 KiB"), Ok(65_536));
    }

    #[test]
    fn bad_sizes_say_why() {
        let cases = [
            ("", "it is empty"),
            ("-1", "must not be negative"),
            ("MiB", "must start with a whole number"),
            ("1.5MiB", "whole number"),
            ("10mb", "unknown unit \"mb\""),
            ("10 apples", "unknown unit \"apples\""),
            ("20000000TiB", "too large"),
            ("99999999999999999999", "too large"),
        ];
        for (input, why) in cases {
            let err = parse_size(input).expect_err(input);
            assert!(
                err.starts_with(&format!("invalid size {input:?}: ")),
                "{err}"
            );
            assert!(err.contains(why), "{input:?}: {err}");
        }
    }
}
