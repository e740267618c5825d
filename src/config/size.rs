//! Byte sizes as admins write them: `"20GiB"`, `"128KiB"`, `"1GB"`, `"512"`, `"1.5GiB"`.
//! Parsing is exact: a fraction is accepted only when it names a whole number of bytes, and
//! every multiplication is overflow-checked, so a typo can never silently become a tiny or huge
//! export.

/// Why a size string was rejected; the message is shown to the admin after `PATH:LINE:`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("{0:?} is not a size (expected a number with an optional unit B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)")]
    Malformed(String),
    #[error("{0:?} has an unknown unit (use B, KiB, MiB, GiB, TiB, KB, MB, GB or TB)")]
    UnknownUnit(String),
    #[error("{0:?} is not a whole number of bytes")]
    Fractional(String),
    #[error("{0:?} is too large")]
    Overflow(String),
}

const KIB: u64 = 1 << 10;

/// The multiplier for a unit suffix (case-insensitive; single letters are binary like qemu's).
fn unit_multiplier(unit: &str) -> Option<u64> {
    let m = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" | "k" => KIB,
        "mib" | "m" => KIB.pow(2),
        "gib" | "g" => KIB.pow(3),
        "tib" | "t" => KIB.pow(4),
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    Some(m)
}

/// Parses a size string into bytes, exactly.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(number_end);
    let number = number.replace('_', "");
    let unit = unit.trim_start();
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number.as_str(), ""),
    };
    let digits_ok = |d: &str| d.bytes().all(|b| b.is_ascii_digit());
    if whole.is_empty() || !digits_ok(whole) || !digits_ok(frac) || number.ends_with('.') {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let multiplier =
        unit_multiplier(unit).ok_or_else(|| SizeError::UnknownUnit(text.to_string()))?;
    let overflow = || SizeError::Overflow(text.to_string());
    let whole: u128 = whole.parse().map_err(|_| overflow())?;
    let mut total = whole
        .checked_mul(u128::from(multiplier))
        .ok_or_else(overflow)?;
    if !frac.is_empty() {
        if frac.len() > 30 {
            return Err(SizeError::Fractional(text.to_string()));
        }
        let scale = 10u128.pow(frac.len() as u32);
        let frac_num: u128 = frac.parse().map_err(|_| overflow())?;
        let scaled = frac_num
            .checked_mul(u128::from(multiplier))
            .ok_or_else(overflow)?;
        if scaled % scale != 0 {
            return Err(SizeError::Fractional(text.to_string()));
        }
        total = total.checked_add(scaled / scale).ok_or_else(overflow)?;
    }
    u64::try_from(total).map_err(|_| overflow())
}

/// Formats bytes with the largest binary unit that divides them exactly (`20GiB`, `1000000000`),
/// so the summary table round-trips through `parse_size`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", KIB * KIB * KIB * KIB),
        ("GiB", KIB * KIB * KIB),
        ("MiB", KIB * KIB),
        ("KiB", KIB),
    ];
    for (name, unit) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{}", bytes / unit, name);
        }
    }
    for (name, unit) in [
        ("TB", 1_000_000_000_000u64),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
    ] {
        if bytes >= unit && bytes % unit == 0 {
            return format!("{}{}", bytes / unit, name);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_decimal_and_plain_units() {
        assert_eq!(parse_size("20GiB"), Ok(20 << 30));
        assert_eq!(parse_size("128KiB"), Ok(128 << 10));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("2 TiB"), Ok(2 << 40));
        assert_eq!(parse_size("3TB"), Ok(3_000_000_000_000));
        assert_eq!(parse_size("4mib"), Ok(4 << 20));
        assert_eq!(parse_size("10G"), Ok(10 << 30));
        assert_eq!(parse_size("1_000KB"), Ok(1_000_000));
    }

    #[test]
    fn exact_fractions_only() {
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("0.5KiB"), Ok(512));
        assert_eq!(parse_size("1.25KB"), Ok(1250));
        assert_eq!(
            parse_size("1.0001KiB"),
            Err(SizeError::Fractional("1.0001KiB".into()))
        );
        assert_eq!(parse_size("1.5"), Err(SizeError::Fractional("1.5".into())));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("GiB"), Err(SizeError::Malformed("GiB".into())));
        assert_eq!(
            parse_size("1.GiB"),
            Err(SizeError::Malformed("1.GiB".into()))
        );
        assert_eq!(
            parse_size(".5GiB"),
            Err(SizeError::Malformed(".5GiB".into()))
        );
        assert_eq!(
            parse_size("1..5GiB"),
            Err(SizeError::Malformed("1..5GiB".into()))
        );
        assert_eq!(parse_size("-1"), Err(SizeError::Malformed("-1".into())));
        assert_eq!(
            parse_size("20GiBs"),
            Err(SizeError::UnknownUnit("20GiBs".into()))
        );
        assert_eq!(
            parse_size("20 PiB"),
            Err(SizeError::UnknownUnit("20 PiB".into()))
        );
    }

    #[test]
    fn overflow_is_checked() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(
            parse_size("18446744073709551616"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("16777216TiB"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn format_round_trips() {
        for n in [
            512u64,
            4096,
            128 << 10,
            20 << 30,
            1_000_000_000,
            1000,
            3 << 29,
            5 << 40,
        ] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{}", format_size(n));
        }
        assert_eq!(format_size(20 << 30), "20GiB");
        assert_eq!(format_size(1_000_000_000), "1GB");
        assert_eq!(format_size(1000), "1000B");
    }
}
