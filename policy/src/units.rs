//! Quantities with units, as operators write them: `50Mbit`, `64KiB`,
//! `20ms`, `10%`. A bare number is the base unit (bits per second, bytes,
//! milliseconds, percent). Decimal prefixes are powers of 1000, binary ones
//! (`Ki`, `Mi`, `Gi`) of 1024.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Splits `12.5Mbit` into (12.5, "Mbit"), trimming spaces.
fn split(s: &str) -> Result<(f64, &str), String> {
    let s = s.trim();
    let end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(end);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("`{s}` does not start with a number"))?;
    Ok((n, unit.trim()))
}

/// A non-negative whole result of `n * mult`, or an error naming `s`.
fn whole(n: f64, mult: f64, s: &str) -> Result<u64, String> {
    let v = (n * mult).round();
    if !v.is_finite() || !(0.0..=1.8e19).contains(&v) {
        return Err(format!("`{s}` is out of range"));
    }
    // In range and whole: the conversion is exact enough for a quantity.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    Ok(v as u64)
}

macro_rules! quantity {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(pub u64);

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    N(u64),
                    S(String),
                }
                match Raw::deserialize(d).map_err(|_| {
                    serde::de::Error::custom(concat!(
                        "expected a number or a string for ",
                        stringify!($name)
                    ))
                })? {
                    Raw::N(n) => Ok($name(n)),
                    Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
                }
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }
    };
}

quantity!(
    Bitrate,
    "A rate in bits per second: `50Mbit`, `50Mbps`, `1.5Gbit`, `800kbit`, `9600`."
);
quantity!(
    Bytes,
    "A size in bytes: `64KiB`, `1MiB`, `64KB` (1000s), `1500`."
);
quantity!(
    Millis,
    "A duration in milliseconds: `20ms`, `1.5s`, `2m`, `500us` (rounded up), `20`."
);

impl FromStr for Bitrate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = split(s)?;
        let unit = unit
            .trim_end_matches("/s")
            .trim_end_matches("ps")
            .trim_end_matches("it");
        let mult = match unit {
            "" | "b" => 1.0,
            "k" | "K" | "kb" | "Kb" => 1e3,
            "M" | "Mb" => 1e6,
            "G" | "Gb" => 1e9,
            "T" | "Tb" => 1e12,
            _ => {
                return Err(format!(
                    "`{s}`: unknown rate unit (use bit, kbit, Mbit, Gbit, or a number of bits per second)"
                ));
            }
        };
        whole(n, mult, s).map(Bitrate)
    }
}

impl fmt::Display for Bitrate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (m, u) in [(1_000_000_000, "Gbit"), (1_000_000, "Mbit"), (1000, "kbit")] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{u}", b / m);
            }
        }
        write!(f, "{b}bit")
    }
}

impl FromStr for Bytes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = split(s)?;
        let mult = match unit {
            "" | "B" => 1.0,
            "k" | "K" | "kB" | "KB" => 1e3,
            "M" | "MB" => 1e6,
            "G" | "GB" => 1e9,
            "Ki" | "KiB" => 1024.0,
            "Mi" | "MiB" => 1024.0 * 1024.0,
            "Gi" | "GiB" => 1024.0 * 1024.0 * 1024.0,
            _ => {
                return Err(format!(
                    "`{s}`: unknown size unit (use B, KB, KiB, MB, MiB, GB, GiB, or a number of bytes)"
                ));
            }
        };
        whole(n, mult, s).map(Bytes)
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (m, u) in [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
            if b >= m && b.is_multiple_of(m) {
                return write!(f, "{}{u}", b / m);
            }
        }
        write!(f, "{b}B")
    }
}

impl FromStr for Millis {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (n, unit) = split(s)?;
        let mult = match unit {
            "" | "ms" => 1.0,
            "us" | "µs" => 1e-3,
            "s" => 1e3,
            "m" | "min" => 60e3,
            _ => {
                return Err(format!(
                    "`{s}`: unknown duration unit (use us, ms, s, m, or a number of milliseconds)"
                ));
            }
        };
        // Sub-millisecond durations round up: a delay asked for is never 0.
        let v = n * mult;
        whole(if v > 0.0 { v.ceil() } else { v }, 1.0, s).map(Millis)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 >= 1000 && self.0.is_multiple_of(1000) {
            write!(f, "{}s", self.0 / 1000)
        } else {
            write!(f, "{}ms", self.0)
        }
    }
}

/// A percentage, `10%` or `10` (0..=100 is checked by the policy checks).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Percent(pub f64);

impl FromStr for Percent {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().trim_end_matches('%').trim();
        t.parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .map(Percent)
            .ok_or_else(|| format!("`{s}` is not a percentage"))
    }
}

impl<'de> Deserialize<'de> for Percent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(f64),
            S(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a percentage such as 10 or \"10%\""))?
        {
            Raw::N(n) => Ok(Percent(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl Serialize for Percent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}%", self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        for (s, v) in [
            ("50Mbit", 50_000_000),
            ("50Mbps", 50_000_000),
            ("50 Mbit/s", 50_000_000),
            ("1.5Gbit", 1_500_000_000),
            ("800kbit", 800_000),
            ("9600", 9600),
        ] {
            assert_eq!(s.parse::<Bitrate>(), Ok(Bitrate(v)), "{s}");
        }
        assert!("50MB".parse::<Bitrate>().is_err());
        assert!("fast".parse::<Bitrate>().is_err());
        assert_eq!(Bitrate(50_000_000).to_string(), "50Mbit");
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!("64KiB".parse::<Bytes>(), Ok(Bytes(65_536)));
        assert_eq!("64KB".parse::<Bytes>(), Ok(Bytes(64_000)));
        assert_eq!("1500".parse::<Bytes>(), Ok(Bytes(1500)));
        assert!("64Kib".parse::<Bytes>().is_err());
        assert_eq!(Bytes(65_536).to_string(), "64KiB");
        assert_eq!("20ms".parse::<Millis>(), Ok(Millis(20)));
        assert_eq!("1.5s".parse::<Millis>(), Ok(Millis(1500)));
        assert_eq!("500us".parse::<Millis>(), Ok(Millis(1)));
        assert!("5h".parse::<Millis>().is_err());
        assert_eq!("10%".parse::<Percent>(), Ok(Percent(10.0)));
        assert!("ten".parse::<Percent>().is_err());
    }
}
