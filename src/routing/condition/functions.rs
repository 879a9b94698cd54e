//! The built-in functions and the .NET conversions they depend on (number parsing and
//! formatting, dates as Newtonsoft reads them, ordinal string comparison).

use std::borrow::Cow;

use super::*;

pub(super) fn call<'a>(f: Func, args: &'a [Expr], slots: &'a Slots<'_>) -> V<'a> {
    let arg = |i: usize| args.get(i).map_or(V::Undef, |e| operand(e, slots));
    match f {
        Func::Math(m) => match arg(0) {
            V::Num(x) => num(match m {
                Math::Abs => x.abs(),
                Math::Exp => x.exp(),
                Math::Ceiling => x.ceil(),
                Math::Floor => x.floor(),
                Math::Sign if x.is_nan() => f64::NAN,
                Math::Sign if x > 0.0 => 1.0,
                Math::Sign if x < 0.0 => -1.0,
                Math::Sign => 0.0,
                Math::Sqrt => x.sqrt(),
                Math::Square => x.powf(2.0),
            }),
            _ => V::Undef,
        },
        Func::Power => match (arg(0), arg(1)) {
            (V::Num(x), V::Num(y)) => num(x.powf(y)),
            _ => V::Undef,
        },
        Func::AsNumber => match arg(0) {
            V::Str(s) => dotnet_parse_double(&s).map_or(V::Undef, num),
            V::Num(x) => num(x),
            _ => V::Undef,
        },
        Func::IsBool => match arg(0) {
            V::Undef => V::Undef,
            v => V::Bool(matches!(v, V::Bool(_))),
        },
        Func::IsDefined => V::Bool(!arg(0).is_undef()),
        Func::IsNullString => V::Bool(matches!(arg(0), V::NullStr)),
        // IsNull.RuntimeQueryValue returns `input != QueryValue.Null` (reference inequality):
        // true for every defined body value except a path that selected nothing. That is
        // edgeHub's behaviour, kept.
        Func::IsNullQuery => match arg(0) {
            V::Undef => V::Undef,
            V::Missing => V::Bool(false),
            _ => V::Bool(true),
        },
        Func::IsNumber => V::Bool(matches!(arg(0), V::Num(x) if x.is_finite())),
        Func::IsString => V::Bool(matches!(arg(0), V::Str(_))),
        Func::Concat => {
            let mut out = String::new();
            for e in args {
                match eval(e, slots) {
                    V::Str(s) => out.push_str(&s),
                    // A null string is defined and concatenates as nothing.
                    V::NullStr => {}
                    _ => return V::Undef,
                }
            }
            V::Str(Cow::Owned(out))
        }
        Func::Length => match arg(0) {
            V::Str(s) => num(s.encode_utf16().count() as f64),
            _ => V::Undef,
        },
        Func::Lower => match arg(0) {
            V::Str(s) => V::Str(Cow::Owned(dotnet_lower(&s))),
            _ => V::Undef,
        },
        Func::Upper => match arg(0) {
            V::Str(s) => V::Str(Cow::Owned(dotnet_upper(&s))),
            _ => V::Undef,
        },
        Func::Substring | Func::SubstringLength => {
            let s = arg(0);
            let (V::Str(s), V::Num(start)) = (s, arg(1)) else {
                return V::Undef;
            };
            let length = if f == Func::SubstringLength {
                match arg(2) {
                    V::Num(n) => Some(n),
                    _ => return V::Undef,
                }
            } else {
                None
            };
            substring(&s, start, length).map_or(V::Undef, |s| V::Str(Cow::Owned(s)))
        }
        Func::IndexOf | Func::StartsWith | Func::EndsWith | Func::Contains => {
            let (a, b) = (arg(0), arg(1));
            let (Some(a), Some(b)) = (string_arg(&a), string_arg(&b)) else {
                return V::Undef;
            };
            match f {
                Func::IndexOf => num(a.find(b).map_or(-1.0, |i| {
                    a.get(..i).map_or(0, |p| p.encode_utf16().count()) as f64
                })),
                Func::StartsWith => V::Bool(a.starts_with(b)),
                Func::EndsWith => V::Bool(a.ends_with(b)),
                _ => V::Bool(a.contains(b)),
            }
        }
    }
}

/// Substring.RuntimeStart / RuntimeStartLength, in UTF-16 code units with .NET's bounds.
pub(super) fn substring(s: &str, start: f64, length: Option<f64>) -> Option<String> {
    let units: Vec<u16> = s.encode_utf16().collect();
    let len = units.len() as f64;
    let range = match length {
        None if start >= 0.0 && start <= len => (start as usize)..units.len(),
        Some(n) if start >= 0.0 && start < len && n >= 0.0 && n <= len - start => {
            (start as usize)..(start as usize + n as usize)
        }
        _ => return None,
    };
    units.get(range).map(String::from_utf16_lossy)
}

pub(super) fn single_char(mut it: impl Iterator<Item = char>) -> Option<char> {
    let c = it.next()?;
    it.next().is_none().then_some(c)
}

/// ToLowerInvariant: one-to-one simple case mapping; .NET leaves U+0130 alone.
pub(super) fn dotnet_lower(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{130}' => c,
            _ => single_char(c.to_lowercase()).unwrap_or(c),
        })
        .collect()
}

/// ToUpperInvariant: one-to-one simple case mapping; .NET leaves U+0131 alone.
pub(super) fn dotnet_upper(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '\u{131}' => c,
            _ => single_char(c.to_uppercase()).unwrap_or(c),
        })
        .collect()
}

/// Newtonsoft reads JSON strings that look like dates as dates (DateParseHandling.DateTime),
/// and edgeHub's QueryValue treats a date as an object, so `$body.time` is undefined when
/// `time` holds an ISO 8601 date-time or `/Date(…)/`.
pub(super) fn is_newtonsoft_date(s: &str) -> bool {
    let b = s.as_bytes();
    match b.first() {
        Some(b'/') => s.starts_with("/Date(") && s.ends_with(")/") && microsoft_date(s),
        Some(c) if c.is_ascii_digit() => {
            s.is_ascii() && (19..=40).contains(&b.len()) && b.get(10) == Some(&b'T') && iso_date(b)
        }
        _ => false,
    }
}

pub(super) fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Newtonsoft's DateTimeParser: `yyyy-MM-ddTHH:mm:ss[.f{1,7}][Z|±HH[:]mm]`.
pub(super) fn iso_date(b: &[u8]) -> bool {
    let end = b.len();
    let digit = |i: usize| {
        b.get(i)
            .filter(|c| c.is_ascii_digit())
            .map(|c| u32::from(c - b'0'))
    };
    let d2 = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);
    let d4 = |i: usize| Some(d2(i)? * 100 + d2(i + 2)?);
    let is = |i: usize, c: u8| b.get(i) == Some(&c);
    // ParseDate and ParseTime: each field in its place and range.
    let time = || -> Option<u32> {
        let year = d4(0).filter(|y| *y >= 1)?;
        let month = d2(5).filter(|m| is(4, b'-') && (1..=12).contains(m))?;
        d2(8).filter(|d| is(7, b'-') && (1..=days_in_month(year, month)).contains(d))?;
        let hour = d2(11).filter(|h| is(10, b'T') && *h <= 24)?;
        let minute = d2(14).filter(|m| is(13, b':') && *m < 60)?;
        let second = d2(17).filter(|s| is(16, b':') && *s < 60)?;
        (hour != 24 || (minute == 0 && second == 0)).then_some(hour)
    };
    let Some(hour) = time() else {
        return false;
    };
    let mut start = 19;
    if is(start, b'.') {
        let mut fraction = 0u32;
        let mut digits = 0;
        loop {
            start += 1;
            if !(start < end && digits < 7) {
                break;
            }
            let Some(d) = digit(start) else {
                break;
            };
            fraction = fraction * 10 + d;
            digits += 1;
        }
        if digits == 0 || (hour == 24 && fraction != 0) {
            return false;
        }
    }
    // ParseZone
    if start < end {
        match b.get(start) {
            Some(b'Z' | b'z') => start += 1,
            c => {
                if start + 2 < end && d2(start + 1).is_some() && matches!(c, Some(b'+' | b'-')) {
                    start += 3;
                }
                if start < end {
                    if is(start, b':') {
                        start += 1;
                    }
                    if start + 1 < end && d2(start).is_some() {
                        start += 2;
                    }
                }
            }
        }
    }
    start == end
}

/// Newtonsoft's `/Date(ticks[±HHmm])/`, on UTF-16 code units like the original. The offset's
/// minutes are not checked: Newtonsoft's test for them compares the string length with a
/// position in its read buffer, so whether it reads them depends on where the string sat.
pub(super) fn microsoft_date(s: &str) -> bool {
    let u: Vec<u16> = s.encode_utf16().collect();
    let len = u.len();
    if len < 9 {
        return false;
    }
    let find = |c: u8| (7..len - 1).find(|&k| u.get(k) == Some(&u16::from(c)));
    let ticks_end = match find(b'+').or_else(|| find(b'-')) {
        Some(k) => {
            if u.get(k + 1..k + 3)
                .and_then(|d| newtonsoft_int(d, 32))
                .is_none()
            {
                return false;
            }
            k
        }
        None => len - 2,
    };
    u.get(6..ticks_end)
        .and_then(|d| newtonsoft_int(d, 64))
        .is_some()
}

/// ConvertUtils.Int32TryParse / Int64TryParse: optional `-`, ASCII digits, no overflow.
pub(super) fn newtonsoft_int(units: &[u16], bits: u32) -> Option<i128> {
    let (negative, digits) = match units.split_first() {
        Some((&m, rest)) if m == u16::from(b'-') => (true, rest),
        _ => (false, units),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut v: i128 = 0;
    for &d in digits {
        let d = u8::try_from(d).ok().filter(u8::is_ascii_digit)?;
        v = v * 10 + i128::from(d - b'0');
    }
    let v = if negative { -v } else { v };
    let limit = 1i128 << (bits - 1);
    (-limit..limit).contains(&v).then_some(v)
}

/// `double.TryParse(s, NumberStyles.Any, CultureInfo.InvariantCulture)` (as_number):
/// surrounding white space, a leading or trailing sign or parentheses, `,` group separators in
/// the integer part, `.`, an exponent, the currency sign `¤`, and the invariant culture's
/// `Infinity`/`-Infinity`/`NaN` in any case.
pub(super) fn dotnet_parse_double(s: &str) -> Option<f64> {
    parse_number_any(s).or_else(|| {
        let t = s.trim();
        let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        if is(t, "Infinity") {
            Some(f64::INFINITY)
        } else if is(t, "-Infinity") {
            Some(f64::NEG_INFINITY)
        } else if is(t, "NaN") {
            Some(f64::NAN)
        } else if let Some(rest) = t.strip_prefix('+') {
            if is(rest, "Infinity") {
                Some(f64::INFINITY)
            } else if is(rest, "NaN") {
                Some(f64::NAN)
            } else {
                None
            }
        } else {
            t.strip_prefix('-')
                .filter(|rest| is(rest, "NaN"))
                .map(|_| f64::NAN)
        }
    })
}

/// The common case, `[+-]digits[.digits][e[+-]digits]` with a non-zero digit: Rust's parser
/// reads it exactly as .NET does (both round correctly), without the general path's allocations.
pub(super) fn plain_decimal(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let start = i;
    let mut nonzero = false;
    let mut dot = false;
    while let Some(&c) = b.get(i) {
        match c {
            b'0'..=b'9' => nonzero |= c != b'0',
            b'.' if !dot => dot = true,
            _ => break,
        }
        i += 1;
    }
    if i == start || !nonzero {
        return None;
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let digits = i;
        while matches!(b.get(i), Some(b'0'..=b'9')) {
            i += 1;
        }
        if i == digits {
            return None;
        }
    }
    if i != b.len() {
        return None;
    }
    s.parse().ok()
}

/// Number.TryParseNumber for NumberStyles.Any with the invariant culture.
pub(super) fn parse_number_any(s: &str) -> Option<f64> {
    if let Some(v) = plain_decimal(s) {
        return Some(v);
    }
    const SIGN: u8 = 1;
    const PARENS: u8 = 2;
    const DIGITS: u8 = 4;
    const NONZERO: u8 = 8;
    const DECIMAL: u8 = 16;
    const CURRENCY: u8 = 32;
    let c: Vec<char> = s.chars().collect();
    let at = |i: usize| c.get(i).copied().unwrap_or('\0');
    let white = |ch: char| ch == ' ' || ('\u{9}'..='\u{d}').contains(&ch);
    let mut p = 0;
    let mut state = 0u8;
    let mut negative = false;
    let mut currency_left = true;
    loop {
        let ch = at(p);
        // White space is skipped until a sign is seen (unless a currency sign followed it).
        if !white(ch) || (state & SIGN != 0 && state & CURRENCY == 0) {
            if state & SIGN == 0 && (ch == '+' || ch == '-') {
                state |= SIGN;
                negative = ch == '-';
            } else if ch == '(' && state & SIGN == 0 {
                state |= SIGN | PARENS;
                negative = true;
            } else if currency_left && ch == '¤' {
                state |= CURRENCY;
                currency_left = false;
            } else {
                break;
            }
        }
        p += 1;
    }
    let mut int_digits = String::new();
    let mut frac_digits = String::new();
    loop {
        let ch = at(p);
        if ch.is_ascii_digit() {
            state |= DIGITS;
            if ch != '0' {
                state |= NONZERO;
            }
            if state & DECIMAL == 0 {
                int_digits.push(ch);
            } else {
                frac_digits.push(ch);
            }
        } else if ch == '.' && state & DECIMAL == 0 {
            state |= DECIMAL;
        } else if !(ch == ',' && state & DIGITS != 0 && state & DECIMAL == 0) {
            break;
        }
        p += 1;
    }
    if state & DIGITS == 0 {
        return None;
    }
    let mut exponent: i32 = 0;
    if matches!(at(p), 'e' | 'E') {
        let mark = p;
        p += 1;
        let mut negative_exponent = false;
        match at(p) {
            '+' => p += 1,
            '-' => {
                negative_exponent = true;
                p += 1;
            }
            _ => {}
        }
        if at(p).is_ascii_digit() {
            while let Some(d) = at(p).to_digit(10) {
                // .NET stops counting past 1000 and uses 9999.
                exponent = if exponent > 1000 {
                    9999
                } else {
                    exponent * 10 + i32::try_from(d).unwrap_or(0)
                };
                p += 1;
            }
            if exponent > 1000 {
                exponent = 9999;
            }
            if negative_exponent {
                exponent = -exponent;
            }
        } else {
            p = mark;
        }
    }
    loop {
        let ch = at(p);
        if !white(ch) {
            if state & SIGN == 0 && (ch == '+' || ch == '-') {
                state |= SIGN;
                negative = ch == '-';
            } else if ch == ')' && state & PARENS != 0 {
                state &= !PARENS;
            } else if currency_left && ch == '¤' {
                currency_left = false;
            } else {
                break;
            }
        }
        p += 1;
    }
    // The parse must use the whole string; trailing NULs are allowed.
    if state & PARENS != 0 || c.get(p..).unwrap_or(&[]).iter().any(|&ch| ch != '\0') {
        return None;
    }
    if state & NONZERO == 0 && state & DECIMAL == 0 {
        negative = false;
    }
    let int_part = if int_digits.is_empty() {
        "0"
    } else {
        &int_digits
    };
    let frac_part = if frac_digits.is_empty() {
        "0"
    } else {
        &frac_digits
    };
    let sign = if negative { "-" } else { "" };
    format!("{sign}{int_part}.{frac_part}e{exponent}")
        .parse::<f64>()
        .ok()
}
