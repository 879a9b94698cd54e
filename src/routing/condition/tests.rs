use super::*;
use serde_json::json;

/// A message in the shape of edgeHub's ConditionCompilerTest and BodyQueryTest messages.
struct Msg {
    app: Vec<(&'static str, Value)>,
    sys: Vec<(&'static str, Value)>,
    body: Option<serde_json::Value>,
    twin: Option<serde_json::Value>,
}

fn lookup(list: &[(&'static str, Value)], name: &str) -> Option<Value> {
    // edgeHub's property maps ignore case.
    list.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

impl MessageView for Msg {
    fn app_property(&self, name: &str) -> Option<Value> {
        lookup(&self.app, name)
    }
    fn system_property(&self, name: &str) -> Option<Value> {
        lookup(&self.sys, name)
    }
    fn body_json(&self) -> Option<&serde_json::Value> {
        self.body.as_ref()
    }
    fn twin_change(&self) -> Option<&serde_json::Value> {
        self.twin.as_ref()
    }
}

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn msg() -> Msg {
    Msg {
        app: vec![
            ("key1", s("value1")),
            ("key2", s("3")),
            ("key3", s("VALUE3")),
            ("null_value", Value::Null),
            ("int_prop", Value::Number(5.0)),
            ("$sys4", s("value4")),
            ("$body.shadowed", s("100")),
            ("a+b", s("plus")),
            ("temperature", s("25.5")),
            ("unicode", s("Tchüss😀")),
        ],
        sys: vec![
            ("sys1", s("sysvalue1")),
            ("sys2", s("4")),
            ("sys3", s("SYSVALUE3")),
            ("sys4", s("sysvalue4")),
            ("messageId", s("mid-1")),
            ("contentType", s("application/json")),
            ("contentEncoding", s("utf-8")),
            ("connectionDeviceId", s("dev1")),
            ("connectionModuleId", s("mod1")),
        ],
        body: Some(json!({
            "temp": 50,
            "neg": -50.4,
            "precise": 50.4,
            "zero": 0,
            "street": "One Microsoft Way",
            "state": "WA",
            "flag": true,
            "off": false,
            "nothing": null,
            "time": "2017-03-09T00:00:00.000Z",
            "day": "2017-03-09",
            "list": [20, 30, 40],
            "nested": {"a": {"b": [{"c": 1}, {"c": 2}]}, "m": [[1, 2], [3]]},
            "shadowed": 50,
            "$x": "dollar",
            "single": {"only": 7},
            "Weather": {"Temperature": 50}
        })),
        twin: None,
    }
}

/// The same message when its content type is not JSON: the caller gives no body.
fn msg_no_json() -> Msg {
    Msg {
        body: None,
        ..msg()
    }
}

fn msg_twin() -> Msg {
    Msg {
        twin: Some(json!({
            "properties": {
                "reported": {
                    "WeatherTwin": {"Temperature": 50, "Location": {"City": "Redmond"}},
                    "nul": null,
                    "$version": 4
                },
                "desired": {}
            },
            "tags": {"site": "a"}
        })),
        ..msg()
    }
}

const T: Value = Value::Bool(true);
const F: Value = Value::Bool(false);
const U: Value = Value::Undefined;
const N: Value = Value::Null;

fn n(x: f64) -> Value {
    Value::Number(x)
}

/// `Msg` that also offers its body as text, so that plain body paths are read in one
/// pass over it instead of from `body_json`.
struct WithText<'a> {
    msg: &'a Msg,
    text: Option<String>,
}

impl<'a> WithText<'a> {
    fn new(msg: &'a Msg) -> Self {
        let text = msg.body.as_ref().map(|b| b.to_string());
        WithText { msg, text }
    }
}

impl MessageView for WithText<'_> {
    fn app_property(&self, name: &str) -> Option<Value> {
        self.msg.app_property(name)
    }
    fn system_property(&self, name: &str) -> Option<Value> {
        self.msg.system_property(name)
    }
    fn body_json(&self) -> Option<&serde_json::Value> {
        self.msg.body_json()
    }
    fn twin_change(&self) -> Option<&serde_json::Value> {
        self.msg.twin_change()
    }
    fn body_text(&self) -> Option<&str> {
        self.text.as_deref()
    }
}

/// Checks every case alone, then all of them together in one [`ConditionSet`] (each
/// twice, so that every condition is also a shared subexpression), from `body_json` and
/// from the body's text.
fn check(cases: &[(&str, Value)], m: &Msg) -> usize {
    let mut failures = Vec::new();
    let mut compiled = Vec::new();
    for (text, want) in cases {
        match Condition::parse(text) {
            Ok(c) => {
                let got = c.evaluate(m);
                if &got != want {
                    failures.push(format!("{text:?}: got {got:?}, want {want:?}"));
                }
                assert_eq!(c.matches(m), got == T, "{text:?}");
                assert_eq!(c.evaluate(&WithText::new(m)), got, "{text:?} from text");
                compiled.push((text, c, want));
            }
            Err(e) => failures.push(format!("{text:?}: {e}")),
        }
    }
    let list: Vec<&Condition> = compiled.iter().flat_map(|(_, c, _)| [c, c]).collect();
    let set = ConditionSet::new(&list);
    let with_text = WithText::new(m);
    for view in [m as &dyn MessageView, &with_text] {
        let slots = set.slots(view);
        // Backwards, so that shared values are often first needed by a later condition.
        for (i, (text, _, want)) in compiled.iter().enumerate().rev() {
            for k in [2 * i + 1, 2 * i] {
                let got = set.evaluate(k, &slots);
                if &got != *want {
                    failures.push(format!("{text:?} in a set: got {got:?}, want {want:?}"));
                }
                assert_eq!(set.matches(k, &slots), got == T, "{text:?} in a set");
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    cases.len()
}

#[test]
fn literals_and_lexing() {
    let cases = [
        ("true", T),
        ("false", F),
        ("null", N),
        ("undefined", U),
        ("3", n(3.0)),
        ("0100", n(100.0)),
        ("-1.234", n(-1.234)),
        ("12.34", n(12.34)),
        (".5", n(0.5)),
        ("1.234e1", n(12.34)),
        ("1.234e+1", n(12.34)),
        ("1.234E-1", n(0.1234)),
        ("2e3", n(2000.0)),
        ("10e1000", n(f64::INFINITY)),
        ("0xDEADBEEF", n(3_735_928_559.0)),
        ("0xdeadbeef = 3735928559", T),
        ("0x00000000000000000001", n(1.0)),
        ("0xFFFFFFFFFFFFFFFF", n(-1.0)),
        // .NET cannot parse these, so edgeHub compiles them to undefined.
        ("e5", U),
        ("0x1FFFFFFFFFFFFFFFF", U),
        ("'a string'", s("a string")),
        ("\"a string\"", s("a string")),
        ("''", s("")),
        (r#""he said, \"Hello!\"""#, s("he said, \"Hello!\"")),
        (r"'it\'s'", s("it's")),
        (r"'back\\slash'", s("back\\slash")),
        (r"'Tch\u00FCss'", s("Tchüss")),
        (r"'\ud83d\ude00'", s("😀")),
        // The two unescape passes of edgeHub run one after the other.
        (r"'\\u0041'", s("\\A")),
        ("'line\nbreak'", s("line\nbreak")),
        ("(((3)))", n(3.0)),
        ("/* comment */ true", T),
        ("true /* a = 'b' */", T),
        ("1 /**/ = /* x */ 1", T),
        // Identifiers swallow operator characters: `a+b` is one application property.
        ("a+b", s("plus")),
        ("a+b = 'plus'", T),
        ("3-1", U),
        ("1 - -2", n(3.0)),
        ("-undefined", U),
        ("'abc'd", U),
        ("TRUE", U),
        ("True = 'x'", U),
        ("trueish", U),
        ("1.5.2", U),
        ("key1!='x'", U),
        ("key1 != 'x'", T),
    ];
    check(&cases, &msg());
}

#[test]
fn operators() {
    let cases = [
        // arithmetic
        ("3 + 4", n(7.0)),
        ("3 + 4 * 5", n(23.0)),
        ("3 + 4 / 4", n(4.0)),
        ("3 - (4 + 0x10)", n(-17.0)),
        ("3 / 4", n(0.75)),
        ("3 / 0", n(f64::INFINITY)),
        ("-3 / 0", n(f64::NEG_INFINITY)),
        ("3 % 4", n(3.0)),
        ("-7 % 3", n(-1.0)),
        ("3 % 0", U),
        ("-(1.234 + 2)", n(-3.234)),
        ("- 5", n(-5.0)),
        ("- -5", n(5.0)),
        ("-(3 % 0)", U),
        ("10 - 2 - 3", n(5.0)),
        ("12 / 2 / 3", n(2.0)),
        ("3 + as_number(key2)", n(6.0)),
        ("3 + as_number(none)", U),
        // string concatenation
        ("'a' || 'b' || 'c'", s("abc")),
        ("'a' || key1 || 'd'", s("avalue1d")),
        ("'a' || null_value || 'd'", s("ad")),
        ("'a' || none || 'd'", U),
        ("'a' || $body.street", s("aOne Microsoft Way")),
        ("'a' || $body.temp", U),
        // comparisons
        ("4 < 7", T),
        ("7 < 7", F),
        ("7 <= 7", T),
        ("8 > 7", T),
        ("7 >= 8", F),
        ("3 + 4 <= 7", T),
        ("'a' < 'b'", T),
        ("'b' >= 'a'", T),
        ("'Z' < 'a'", T),
        ("'a' < none", U),
        ("3 < as_number(none)", U),
        ("true > false", T),
        ("false < true", T),
        ("true >= true", T),
        ("null <= null", T),
        ("null < null", F),
        ("undefined < undefined", U),
        // U+FFFD sorts after U+1F600 in UTF-16 (a surrogate pair), unlike in UTF-8.
        ("'\u{1F600}' < '\u{FFFD}'", T),
        // equality
        ("3 = 3", T),
        ("3 = 4", F),
        ("3 != 3", F),
        ("3 <> 4", T),
        ("'3' = '3'", T),
        ("\"3\" <> \"4\"", T),
        ("true = true", T),
        ("true = false", F),
        ("false != true", T),
        ("null = null", T),
        ("null != null", F),
        ("undefined = undefined", U),
        ("key2 = '3'", T),
        ("key2 != '3'", F),
        ("none = 'x'", U),
        ("none <> 'x'", U),
        ("0 = -0", T),
        ("1 < 2 = 3 < 4", T),
        // precedence: NOT binds tighter than comparison, AND than OR, ?? loosest
        ("NOT false = true", T),
        ("not (true and false)", T),
        ("true or false and false", T),
        ("(true or false) and false", F),
        ("NOT NOT true", T),
        // logic
        ("true AND true", T),
        ("true and false", F),
        ("TRUE = 'x' or true", T),
        ("false or false", F),
        ("not true", F),
        ("not null", T),
        ("undefined or false", U),
        ("undefined or true", T),
        ("true or undefined", T),
        ("false or undefined", U),
        ("undefined or undefined", U),
        ("true and undefined", U),
        ("false and undefined", F),
        ("undefined and false", F),
        ("undefined and undefined", U),
        ("none = 'true' or true", T),
        ("none = 'true' or false", U),
        ("none = 'true' and false", F),
        ("none = 'true' and true", U),
        ("not (none = 'true')", U),
        ("null and null", N),
        ("null and true", N),
        ("(null and false) = null", T),
        ("null or true", T),
        ("null or false", F),
        ("null or null", N),
        ("null or (none = 'x')", U),
        // coalesce
        ("undefined ?? undefined", U),
        ("(key1 ?? 'hello') = 'value1'", T),
        ("(none ?? 'hello') = 'hello'", T),
        ("none ?? none ?? 'hello'", s("hello")),
        ("as_number(key1) ?? 12.34", n(12.34)),
        ("3 % 0 ?? 1", n(1.0)),
        ("null_value ?? 'x'", N),
        ("null ?? null", N),
        ("$body.temp ?? 1", n(50.0)),
        ("$body.missing ?? 1", N),
        ("$body.list ?? 'x'", s("x")),
    ];
    check(&cases, &msg());
}

#[test]
fn references() {
    let cases = [
        // bare names are application properties, looked up ignoring case
        ("key1", s("value1")),
        ("KEY1 = 'value1'", T),
        ("none", U),
        ("sys1", U),
        // non-string application properties are null strings, as in edgeHub
        ("null_value", N),
        ("int_prop", N),
        ("int_prop = '5'", U),
        ("is_defined(int_prop)", T),
        ("is_null(int_prop)", T),
        // $name: application property `$name` first, then system property `name`
        ("$sys1", s("sysvalue1")),
        ("$SYS1 = 'sysvalue1'", T),
        ("$sys4", s("value4")),
        ("{$sys4}", s("sysvalue4")),
        ("{ $sys1 } = 'sysvalue1'", T),
        ("$messageId", s("mid-1")),
        ("$connectionModuleId = 'mod1'", T),
        ("is_defined($none)", F),
        ("NOT is_defined($outputName)", T),
        ("$sys2 = '4'", T),
        ("as_number($sys2) = 4", T),
        // brackets are not allowed in property names: edgeHub compiles them to undefined
        ("$sys1[0]", U),
        ("{$sys1[0]}", U),
        ("$", U),
        // $body paths
        ("$body.temp", n(50.0)),
        ("$BODY.temp = 50", T),
        ("$bODy.temp <= 50", T),
        ("$body.temp = 40 + 10", T),
        ("$body.neg", n(-50.4)),
        ("$body.street", s("One Microsoft Way")),
        ("$body.flag", T),
        ("$body.off", F),
        ("$body.nothing", N),
        ("$body.list[0]", n(20.0)),
        ("$body.list[2] = 40", T),
        ("$body.list[3]", N),
        ("$body.list[0] + $body.list[1]", n(50.0)),
        ("$body.list[1] * $body.list[2] = 1200", T),
        ("$body.nested.a.b[1].c", n(2.0)),
        ("$body.nested.m[0][1]", n(2.0)),
        ("$body.Weather.Temperature", n(50.0)),
        ("$body.weather.temperature", N),
        ("$body.$.temp", n(50.0)),
        ("$body.$x", s("dollar")),
        ("$body.single.*", n(7.0)),
        ("$body.list[0]x", U),
        ("$body.temp]", U),
        // objects, arrays and dates are undefined; a missing path is null
        ("$body.list", U),
        ("$body.nested", U),
        ("$body.$", U),
        ("$body.time", U),
        ("$body.time <> '100'", U),
        ("$body.day", s("2017-03-09")),
        ("$body.missing", N),
        ("$body.missing = null", T),
        ("$body.missing.deeper = null", T),
        ("$body.temp.deeper", N),
        ("$body.missing <> '100'", T),
        ("NOT ($body.missing != null)", T),
        ("$body", U),
        // body values compare across types by QueryValue's type order
        ("$body.temp = '50'", F),
        ("$body.temp <> '50'", T),
        ("$body.temp < 'a'", T),
        ("$body.temp != null", T),
        ("$body.temp > true", T),
        ("$body.state = 'WA'", T),
        ("$body.state = $body.street", F),
        ("$body.state <> $body.street", T),
        ("$body.flag = true", T),
        ("key1 = $body.missing", F),
        ("none = $body.state", U),
        // `$body.x` yields to an application property of that exact name; `{$body.x}` does not
        ("$body.shadowed", s("100")),
        ("$body.shadowed = '100'", T),
        ("as_number($body.shadowed) = 100", T),
        ("{$body.shadowed} = 50", T),
        // body-query logic: both sides must be booleans
        ("$body.flag AND $body.flag", T),
        ("$body.flag OR $body.off", T),
        ("$body.off OR NOT($body.off)", T),
        ("NOT $body.off", T),
        ("NOT $body.temp", U),
        ("$body.off AND undefined", U),
        ("$body.flag AND key1", U),
        ("$body.flag OR null", U),
        ("$body.temp / 0", n(f64::INFINITY)),
        ("$body.zero / $body.zero", U),
        ("is_defined($body.zero / $body.zero)", T),
    ];
    let count = check(&cases, &msg());
    assert!(count > 0);
}

#[test]
fn body_needs_json() {
    let cases = [
        ("$body.temp", U),
        ("$body.temp = 50", U),
        ("$body.missing", U),
        ("is_defined($body.temp)", F),
        ("$body.shadowed", s("100")),
        ("{$body.shadowed}", U),
        ("$body.temp = 50 OR true", T),
        ("key1 = 'value1'", T),
    ];
    check(&cases, &msg_no_json());
    // A body whose top level is not an object is like no body (JObject.Parse fails).
    let array_body = Msg {
        body: Some(json!([1, 2])),
        ..msg()
    };
    check(&[("$body.$", U), ("$body.missing", U)], &array_body);
}

#[test]
fn functions() {
    let cases = [
        // math
        ("abs(-12)", n(12.0)),
        ("ABS(as_number(key2))", n(3.0)),
        ("abs($body.neg) = 50.4", T),
        ("is_defined(abs(as_number(key1)))", F),
        ("exp(0)", n(1.0)),
        ("abs(exp(1) - 2.718281) < 1e-6", T),
        ("exp(4000) = 3/0", T),
        ("power(2, 3)", n(8.0)),
        ("POWER(10, 4000) = 3/0", T),
        ("power($body.temp, 2)", n(2500.0)),
        ("power(-8, 0.5)", U),
        ("square(3)", n(9.0)),
        ("square($body.temp) = 2500", T),
        ("ceiling(2.1)", n(3.0)),
        ("ceiling(-2.1)", n(-2.0)),
        ("floor(2.1)", n(2.0)),
        ("floor(-2.1)", n(-3.0)),
        ("sign(0)", n(0.0)),
        ("sign(2.1)", n(1.0)),
        ("sign(-2)", n(-1.0)),
        ("sign(-3 / 0)", n(-1.0)),
        ("sign($body.neg)", n(-1.0)),
        ("is_defined(sign(3 % 0))", F),
        ("sqrt(4)", n(2.0)),
        ("SQRT(-4)", U),
        ("is_defined(sqrt(3 / 0))", T),
        // type checks
        ("as_number('3')", n(3.0)),
        ("as_number(key2) * 3 = 9", T),
        ("as_number(key1)", U),
        ("as_number(null_value)", U),
        ("as_number(4)", n(4.0)),
        ("as_number(as_number(4)) * 3", n(12.0)),
        ("as_number('10e10') = 10e10", T),
        ("as_number('10e1000') = 1/0", T),
        ("as_number(' -1,234.5e1 ')", n(-12345.0)),
        ("as_number('(42)')", n(-42.0)),
        ("as_number('42-')", n(-42.0)),
        ("as_number('¤5')", n(5.0)),
        ("as_number('infinity') = 1/0", T),
        ("as_number('NaN')", U),
        ("as_number('0x10')", U),
        ("as_number('- 1')", U),
        ("as_number('')", U),
        ("as_number(temperature) > 25", T),
        ("as_number($body.temp)", n(50.0)),
        ("as_number($body.state)", U),
        ("is_bool(true)", T),
        ("IS_BOOL(false)", T),
        ("is_bool(12.34)", F),
        ("is_bool('x')", F),
        ("is_bool(key1)", F),
        ("is_bool(none)", F),
        ("is_bool(undefined)", F),
        ("is_bool(undefined = undefined)", U),
        ("is_bool($body.flag)", T),
        ("is_bool($body.temp)", F),
        ("is_bool($body.list)", U),
        ("is_defined(undefined)", F),
        ("is_defined(key1)", T),
        ("is_defined(key4)", F),
        ("is_defined(null)", T),
        ("is_defined(null_value)", T),
        ("is_defined(10e1000)", T),
        ("is_defined(3 % 0)", F),
        ("is_defined(undefined and true)", F),
        ("is_defined($body.street)", T),
        ("is_defined($body.missing)", T),
        ("is_defined($body.list)", F),
        ("is_null(null)", T),
        ("is_null(null_value)", T),
        ("is_null(none)", F),
        ("is_null(key1)", F),
        ("is_null(12.34)", F),
        ("is_null(3 / 0)", F),
        ("is_null(true)", F),
        ("is_null($body.nothing)", T),
        // edgeHub's is_null on a body value is `value != <missing>`: true for any value
        ("is_null($body.temp)", T),
        ("is_null($body.missing)", F),
        ("is_null($body.list)", U),
        ("is_number(12.34)", T),
        ("is_number(3 / 0)", F),
        ("is_number(as_number(key2))", T),
        ("is_number(as_number(key1))", F),
        ("is_number('1')", F),
        ("is_number($body.temp)", T),
        ("is_number($body.state)", F),
        ("is_number($body.list)", F),
        ("is_string('x')", T),
        ("is_string(key1)", T),
        ("is_string(null_value)", F),
        ("is_string(none)", F),
        ("is_string(12.34)", F),
        ("is_string('a' || 'b')", T),
        ("is_string($body.street)", T),
        ("is_string($body.temp)", F),
        // strings
        ("concat('a', 'b', 'c', 'd')", s("abcd")),
        ("CONCAT('a', key1, 'd')", s("avalue1d")),
        ("concat('a', null_value, 'd')", s("ad")),
        ("is_defined(concat('a', none, 'd'))", F),
        (
            "concat($body.street, ', ', $body.state) = 'One Microsoft Way, WA'",
            T,
        ),
        ("concat('a', $body.temp)", U),
        ("length('HELLO')", n(5.0)),
        ("LENGTH('')", n(0.0)),
        ("length(key3)", n(6.0)),
        ("length(unicode)", n(8.0)),
        ("length(null_value)", U),
        ("length($body.state)", n(2.0)),
        ("lower('HELLO')", s("hello")),
        ("lower(key3)", s("value3")),
        ("lower('İ')", s("İ")),
        ("upper(key1)", s("VALUE1")),
        ("upper('straße')", s("STRAßE")),
        ("upper('ı')", s("ı")),
        ("lower(none)", U),
        ("upper($body.street)", s("ONE MICROSOFT WAY")),
        ("substring('abc', 1)", s("bc")),
        ("substring('abc', 3)", s("")),
        ("substring('abc', 4)", U),
        ("substring('abc', -1)", U),
        ("substring('abc', 1.9)", s("bc")),
        ("substring('abc', 1 % 0)", U),
        ("substring(key1, 1)", s("alue1")),
        ("substring(null_value, 1)", U),
        ("substring('abc', 1, 1)", s("b")),
        ("substring('abc', 1, 0)", s("")),
        ("substring('abc', 3, 0)", U),
        ("substring('abc', -1, 0)", U),
        ("substring('abc', 1, -2)", U),
        ("substring('abc', 1, 3)", U),
        ("substring('hello', 4, 1)", s("o")),
        ("substring(unicode, 0, 5)", s("Tchüs")),
        (
            "substring($body.street, length($body.street) - 3)",
            s("Way"),
        ),
        ("index_of('abcdef', 'cd')", n(2.0)),
        ("index_of('abc', 'xz')", n(-1.0)),
        ("index_of('abc', '')", n(0.0)),
        ("index_of(unicode, '😀')", n(6.0)),
        ("index_of(none, '1')", U),
        ("index_of($body.street, 'Way') > 6", T),
        ("starts_with('abc', 'ab')", T),
        ("starts_with('abc', 'xz')", F),
        ("STARTS_WITH(key1, 'val')", T),
        ("starts_with(null_value, '1')", U),
        ("ends_with('abc', 'bc')", T),
        ("ends_with('abc', key1)", F),
        ("ends_with($body.street, 'Way')", T),
        ("contains('abc', 'b')", T),
        ("contains('abc', 'xz')", F),
        ("contains(none, '1')", U),
        ("contains($body.street, 'Microsoft')", T),
        ("contains($body.temp, '5')", U),
        // twin_change_includes: no twin body on this message
        ("twin_change_includes(properties.reported.WeatherTwin)", U),
    ];
    check(&cases, &msg());
}

#[test]
fn twin_change_includes_paths() {
    let cases = [
        ("twin_change_includes(properties.reported.WeatherTwin)", T),
        ("TWIN_CHANGE_INCLUDES(properties.reported.WeatherTwin)", T),
        (
            "twin_change_includes(properties.reported.WeatherTwin.Location.City)",
            T,
        ),
        ("twin_change_includes(properties.reported.nul)", T),
        ("twin_change_includes(properties.reported.Other)", F),
        ("twin_change_includes(properties.desired.WeatherTwin)", F),
        ("twin_change_includes(tags.site)", T),
        ("twin_change_includes(properties.reported.$version)", T),
        (
            "twin_change_includes(properties.reported.WeatherTwin.Location.City) AND \
             Not(twin_change_includes(properties.reported.WeatherTwin.Temperature123))",
            T,
        ),
        // the argument is the tokens' text: spaces around `-` vanish
        ("twin_change_includes(properties.reported.a - b)", F),
    ];
    check(&cases, &msg_twin());
    let c = Condition::parse("twin_change_includes(properties.reported.x)").unwrap();
    assert!(c.uses_twin_change());
    assert!(!c.uses_body());
}

#[test]
fn invalid_conditions() {
    let cases = [
        "",
        "   ",
        "/* only a comment */",
        // unbalanced parentheses
        "(true",
        "((true)",
        "true)",
        "(true))",
        "abs(1",
        "abs(1))",
        "()",
        // unknown function, wrong arity, wrong argument types
        "foo(1)",
        "is_defined()",
        "is_defined(1, 2)",
        "abs(3, 4)",
        "power(2)",
        "concat()",
        "concat('a')",
        "concat(3, 'a')",
        "substring('hello')",
        "substring('a', 'b')",
        "substring(1, 2, 3, 4)",
        "index_of('hello', 'a', 'b')",
        "starts_with('a', 1)",
        "length(12.34)",
        "lower(null)",
        "upper(undefined)",
        "abs(null)",
        "abs(key1)",
        "sqrt(true)",
        "as_number(true)",
        "as_number(null)",
        "twin_change_includes()",
        "twin_change_includes(      )",
        "twin_change_includes('properties.reported.x')",
        "twin_change_includes(properties.)",
        "twin_change_includes(123123)",
        "twin_change_includes(properties.abcd123)",
        "twin_change_includes(properties.desired.twin,,,,,)",
        "twin_change_includes(properties[0])",
        // bad tokens
        "@32 = 32",
        "32 = [32]",
        "(@)",
        "a ; b",
        "a : b",
        "a ? b",
        "test == true",
        "key1 = 'x' \\",
        "select",
        "a = 1 INTO",
        "WHERE true",
        // unterminated string or comment, bad escapes
        "none = \"",
        "'abc",
        "\"unterminated = 'unterminated'",
        r"'bad \n escape'",
        r"'\u12'",
        "true /* open",
        // syntax
        "true false",
        "3 4",
        "a = 1 b",
        "a -1",
        "1 +",
        "AND true",
        "true AND",
        "NOT",
        "-",
        "{key1}",
        "{$sys1",
        "{}",
        "abs(,1)",
        "abs(1,)",
        // type errors
        "is_defined(3 + none)",
        "is_defined(3 + null_value)",
        "is_defined(true + 3)",
        "is_defined('a' + 'b')",
        "is_defined(undefined + 3)",
        "is_defined(3 % undefined)",
        "is_defined(3 = none)",
        "is_defined(3 < null_value)",
        "temperature > 20",
        "key1 ?? \"hello\" = \"value1\"",
        "(key1 ?? 12.34)",
        "(as_number(key2) ?? key1)",
        "(key1 ?? null)",
        "(key1 ?? true)",
        "'a' || null",
        "'a' || undefined",
        "'a' || true",
        "none and true",
        "undefined and \"hello\"",
        "none or true",
        "null and undefined",
        "undefined or null",
        "- (key1)",
        "-undefined + 1",
        "- undefined",
        "is_defined(not key1)",
        "NOT undefined",
        "1 = undefined",
        "null = false",
        "$body.temp = undefined",
        // body-query specifics edgeHub cannot compile
        "- $body.temp",
        "undefined ?? 'x'",
        "$body.list[*]",
        "$body.list[-1]",
        "$body.temp + key2",
        "$body.temp % 2",
        "true AND $body.flag",
        "$body.flag AND null",
        "$body.",
        "$body.a..b",
        "$body.a.",
        "$body.a[]",
        "$body.a[x]",
        "$body.a[0",
        "$body.a.0",
        "$body.[0]",
        "$body;@",
    ];
    let mut accepted = Vec::new();
    for text in cases {
        if let Ok(c) = Condition::parse(text) {
            accepted.push(format!("{text:?} => {c:?}"));
        }
    }
    assert!(accepted.is_empty(), "\n{}", accepted.join("\n"));
}

#[test]
fn error_positions() {
    let cases = [
        ("", 0, "empty condition"),
        ("@32 = 32", 0, "invalid symbol '@'"),
        ("a = 'x' AND", 11, "ends where an expression is expected"),
        ("1 + 'x'", 2, "invalid operands to binary operator '+'"),
        ("key1 and true", 5, "'and'"),
        ("(a = 'b'", 0, "missing closing ')'"),
        ("a = 'b')", 7, "unmatched closing ')'"),
        ("true   foo(1)", 7, "unexpected 'foo'"),
        ("  foo(1)", 2, "invalid built-in function 'foo'"),
        ("abs('x')", 0, "abs(string)"),
        ("a = \"open", 4, "unterminated string"),
        ("é = ü;", 7, "invalid symbol ';'"),
        ("$body.a[] = 1", 0, "invalid $body query"),
    ];
    for (text, position, fragment) in cases {
        let e = Condition::parse(text).unwrap_err();
        assert_eq!(e.position, position, "{text:?}: {e}");
        assert!(e.message.contains(fragment), "{text:?}: {e}");
    }
    let e = Condition::parse("1 + 'x'").unwrap_err();
    assert_eq!(
        e.to_string(),
        "at position 2: invalid operands to binary operator '+': have 'number' and 'string'"
    );
}

#[test]
fn uses_body_and_debug() {
    assert!(Condition::parse("$body.temp > 1").unwrap().uses_body());
    assert!(Condition::parse("$body.shadowed = '1'")
        .unwrap()
        .uses_body());
    assert!(Condition::parse("{$BODY.x} = 1").unwrap().uses_body());
    assert!(!Condition::parse("$sys1 = 'x'").unwrap().uses_body());
    assert!(!Condition::parse("$bodyx = 'x'").unwrap().uses_body());
    // `-$body.x` without a space is an application property named `-$body.x`
    assert!(!Condition::parse("-$body.x = 'y'").unwrap().uses_body());
    let c = Condition::parse("true").unwrap();
    assert_eq!(format!("{c:?}"), "Condition(\"true\")");
    assert_eq!(c.as_str(), "true");
    let c2 = c.clone();
    assert!(c2.matches(&msg()));
    assert!(!Condition::parse("'x'").unwrap().matches(&msg()));
    assert!(!Condition::parse("null").unwrap().matches(&msg()));
    assert!(!Condition::parse("$body.temp").unwrap().matches(&msg()));
    assert!(Condition::parse("$body.flag").unwrap().matches(&msg()));
}

#[test]
fn leaf_device_idiom() {
    let c = Condition::parse("NOT is_defined($connectionModuleId)").unwrap();
    assert!(!c.matches(&msg()));
    let leaf = Msg {
        sys: vec![("connectionDeviceId", s("leaf"))],
        ..msg()
    };
    assert!(c.matches(&leaf));
}

#[test]
fn newtonsoft_dates() {
    for date in [
        "2017-03-09T00:00:00.000Z",
        "2017-03-09T00:00:00",
        "2017-03-09T23:59:59.1234567+01:00",
        "2017-03-09T23:59:59-0130",
        "2016-02-29T24:00:00Z",
        "/Date(1234567890)/",
        "/Date(-1234567890+0100)/",
    ] {
        assert!(is_newtonsoft_date(date), "{date}");
    }
    for not_date in [
        "2017-03-09",
        "2017-02-29T00:00:00",
        "2017-13-09T00:00:00",
        "2017-03-09T24:00:01",
        "2017-03-09T00:00:00.",
        "2017-03-09 00:00:00",
        "2017-03-09T00:00:00Zx",
        "/Date()/",
        "/Date(abc)/",
        "x2017-03-09T00:00:00",
        "",
    ] {
        assert!(!is_newtonsoft_date(not_date), "{not_date}");
    }
}

#[test]
fn dotnet_number_parsing() {
    let cases: [(&str, Option<f64>); 16] = [
        ("3", Some(3.0)),
        ("  3  ", Some(3.0)),
        ("+3", Some(3.0)),
        ("1,000", Some(1000.0)),
        (",5", None),
        ("1.", Some(1.0)),
        (".5", Some(0.5)),
        ("1e", None),
        ("1e-2", Some(0.01)),
        ("1E+2", Some(100.0)),
        ("(3)", Some(-3.0)),
        ("(3", None),
        ("3\0\0", Some(3.0)),
        ("-Infinity", Some(f64::NEG_INFINITY)),
        ("1e99999", Some(f64::INFINITY)),
        ("abc", None),
    ];
    for (text, want) in cases {
        assert_eq!(dotnet_parse_double(text), want, "{text:?}");
    }
    assert!(dotnet_parse_double("-nan").is_some_and(f64::is_nan));
}

#[test]
fn nesting_is_bounded() {
    let deep = format!("{}1{}", "(".repeat(10_000), ")".repeat(10_000));
    assert!(Condition::parse(&deep).is_err());
    let nots = format!("{}true", "NOT ".repeat(10_000));
    assert!(Condition::parse(&nots).is_err());
    let calls = format!("{}1{}", "abs(".repeat(10_000), ")".repeat(10_000));
    assert!(Condition::parse(&calls).is_err());
    let chain = format!("1{}", " + 1".repeat(10_000));
    assert!(Condition::parse(&chain).is_err());
    // Within the limits everything works.
    let ok = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
    assert_eq!(Condition::parse(&ok).unwrap().evaluate(&msg()), n(1.0));
    let ok = format!("true{}", " AND true".repeat(MAX_DEPTH - 1));
    assert!(Condition::parse(&ok).unwrap().matches(&msg()));
    let wide = format!("concat('a'{})", ", 'b'".repeat(10_000));
    let c = Condition::parse(&wide).unwrap();
    assert_eq!(c.evaluate(&msg()), s(&format!("a{}", "b".repeat(10_000))));
}

/// Random conditions from fragments of the language: parsing and evaluating must never
/// panic.
#[test]
fn fuzz_never_panics() {
    const PARTS: &[&str] = &[
        "(",
        ")",
        "'",
        "\"",
        "\\",
        "\\u",
        "$body.",
        "$",
        "[",
        "]",
        "0",
        "1",
        "9",
        ".",
        "e",
        "x",
        "-",
        "+",
        "*",
        "/",
        "%",
        " ",
        "AND ",
        "or ",
        "NOT ",
        "??",
        "||",
        "=",
        "<",
        ">",
        "!",
        "{",
        "}",
        "/*",
        "*/",
        ",",
        "ü",
        "😀",
        "abs(",
        "concat(",
        "substring(",
        "twin_change_includes(",
        "properties.reported.",
        "is_null(",
        "as_number(",
        "key1",
        "$sys1",
        "null",
        "true",
        "undefined",
        "0x",
        "[0]",
        "list",
        "temp",
        "time",
        "@",
        ";",
        "\t",
        "\n",
        "?",
        "&",
        "|",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (m, t) = (msg(), msg_twin());
    let mut parsed = Vec::new();
    for _ in 0..30_000 {
        let len = (next() % 12) as usize;
        let text: String = (0..len)
            .map(|_| PARTS[(next() % PARTS.len() as u64) as usize])
            .collect();
        if let Ok(c) = Condition::parse(&text) {
            let _ = c.evaluate(&m);
            let _ = c.matches(&t);
            parsed.push(c);
        }
    }
    assert!(
        parsed.len() > 100,
        "only {} random conditions parsed",
        parsed.len()
    );
    let set = ConditionSet::new(&parsed.iter().collect::<Vec<_>>());
    let view = WithText::new(&m);
    let slots = set.slots(&view);
    for (i, c) in parsed.iter().enumerate() {
        assert_eq!(set.evaluate(i, &slots), c.evaluate(&m), "{c:?}");
    }
}

/// Records what conditions ask a message for.
struct Counting<'a> {
    view: WithText<'a>,
    asked: std::cell::RefCell<Vec<String>>,
}

impl Counting<'_> {
    fn asked(&self, what: String) {
        self.asked.borrow_mut().push(what);
    }
}

impl MessageView for Counting<'_> {
    fn app_property(&self, name: &str) -> Option<Value> {
        self.asked(format!("app {name}"));
        self.view.app_property(name)
    }
    fn system_property(&self, name: &str) -> Option<Value> {
        self.asked(format!("system {name}"));
        self.view.system_property(name)
    }
    fn body_json(&self) -> Option<&serde_json::Value> {
        self.asked("body_json".to_owned());
        self.view.body_json()
    }
    fn twin_change(&self) -> Option<&serde_json::Value> {
        self.asked("twin_change".to_owned());
        self.view.twin_change()
    }
    fn body_text(&self) -> Option<&str> {
        self.asked("body_text".to_owned());
        self.view.body_text()
    }
}

fn set_of(texts: &[&str]) -> (ConditionSet, Vec<Condition>) {
    let conditions: Vec<Condition> = texts
        .iter()
        .map(|t| Condition::parse(t).unwrap_or_else(|e| panic!("{t}: {e}")))
        .collect();
    let set = ConditionSet::new(&conditions.iter().collect::<Vec<_>>());
    (set, conditions)
}

#[test]
fn a_set_looks_each_name_up_once_ignoring_case() {
    let (set, _) = set_of(&[
        "key1 = 'value1'",
        "KEY1 = 'x' OR Key1 <> 'y'",
        // `$key1` reads the application property `$key1`, then the system property.
        "$key1 = 'value1'",
        "{$KEY1} = 'z'",
        "$body.temp > 1",
        "$BODY.temp < 100",
        // Body member names are case-sensitive: there is `temp`, not `Temp`.
        "$body.Temp = 50",
        "$body.list[0] = 20 AND {$body.list[0]} = 20",
    ]);
    // key1; $key1 and system key1; the application property $body.temp (any case) and the
    // body paths temp and Temp; list[0], which has brackets, so it is only a body path.
    assert_eq!(set.lookups(), 7);

    let m = msg();
    let counting = Counting {
        view: WithText::new(&m),
        asked: Default::default(),
    };
    let slots = set.slots(&counting);
    let results: Vec<Value> = (0..8).map(|i| set.evaluate(i, &slots)).collect();
    assert_eq!(results, [T, T, U, U, T, T, F, T]);
    let mut asked = counting.asked.take();
    asked.sort();
    assert_eq!(
        asked,
        [
            "app $body.temp",
            "app $key1",
            "app key1",
            "body_text",
            "system key1",
        ],
        "each lookup once; every body path from one pass over the text"
    );
}

#[test]
fn dollar_names_and_escaped_names_in_a_set() {
    let m = Msg {
        app: vec![
            ("$connectionModuleId", s("from-app")),
            ("$body.temp", s("shadow")),
        ],
        ..msg()
    };
    let texts = [
        "$connectionModuleId = 'from-app'",
        "{$connectionModuleId} = 'mod1'",
        "$connectionDeviceId = 'dev1'",
        "{$connectionDeviceId} = 'dev1'",
        "$body.temp = 'shadow'",
        "{$body.temp} = 50",
        "$body.temp = 50",
    ];
    let (set, conditions) = set_of(&texts);
    let with_text = WithText::new(&m);
    for view in [&m as &dyn MessageView, &with_text] {
        let slots = set.slots(view);
        for (i, c) in conditions.iter().enumerate() {
            let want = if i == 6 { F } else { T };
            assert_eq!(c.evaluate(view), want, "{}", texts[i]);
            assert_eq!(set.evaluate(i, &slots), want, "{} in a set", texts[i]);
        }
    }
}

#[test]
fn repeated_tests_are_shared() {
    let (set, _) = set_of(&[
        "$connectionModuleId = 'mod1' AND as_number(key2) % 2 = 1",
        "$connectionModuleId = 'mod1' AND as_number(key2) % 3 = 0",
        "$connectionModuleId = 'mod1' AND as_number(key2) % 3 = 0",
        // Strings are not shared (a shared value borrows nothing); constants need not be.
        "lower(key3) = 'value3' AND 1 + 1 = 2",
        "lower(key3) = 'value3' AND 1 + 1 = 2 OR false",
    ]);
    // The module test, as_number(key2), the second condition (used twice) and the
    // `lower(...)` comparison: not `... % 2 = 1` (used once), and nothing inside the
    // second condition is counted twice for it being used twice.
    assert_eq!(set.shared(), 4);
    let m = msg();
    let slots = set.slots(&m);
    let results: Vec<Value> = (0..5).map(|i| set.evaluate(i, &slots)).collect();
    assert_eq!(results, [T, T, T, T, T]);
}

/// A body path as the run time reads it (negative indexes get there only in trailing
/// text the grammar ignores, so they are made directly).
fn body_path(query: &str) -> Lookup {
    let steps = newtonsoft_steps(query);
    assert!(steps.is_some(), "{query}");
    Lookup::Body(JsonPath { steps })
}

/// The one-pass reader against `body_query` on the parsed document, for every path.
fn compare_body_reads(documents: &[&str], queries: &[&str]) {
    let lookups: Vec<Lookup> = queries.iter().map(|q| body_path(q)).collect();
    let paths = BodyPaths::new(&lookups);
    assert_eq!(paths.slots.len(), queries.len(), "all paths are plain");
    for text in documents {
        let m = Msg {
            body: serde_json::from_str(text).ok(),
            ..msg()
        };
        let read = paths.read(text);
        for (k, &slot) in paths.slots.iter().enumerate() {
            let Lookup::Body(path) = &lookups[slot] else {
                unreachable!()
            };
            let want = format!("{:?}", body_query(path, &m));
            let got = format!("{:?}", read[k]);
            assert_eq!(got, want, "{} in {text}", queries[slot]);
        }
    }
}

#[test]
fn body_paths_read_in_one_pass_select_what_the_document_does() {
    let queries = [
        "a", "a.b", "a.b.c", "a[0]", "a[1].b", "a[-1]", "a[-1].b", "list[2]", "list[5]", "s",
        "esc", "date", "n", "big", "neg", "x.y", "kv", "é",
    ];
    let documents = [
        r#"{"a": 1, "list": [1, 2, 3], "s": "text", "n": null}"#,
        r#"{"a": {"b": {"c": true}}, "a": {"b": 2}}"#,
        r#"{"a": {"b": 1}, "a": [5, {"b": "x"}]}"#,
        r#"{"a": [5, {"b": "x"}], "a": {"b": 1}}"#,
        r#"{"a": [], "list": {"2": 7}, "x": {"y": [1]}}"#,
        r#"{"esc": "tab\there \"q\" \u00e9", "date": "2017-03-09T00:00:00Z", "é": 1}"#,
        r#"{"big": 18446744073709551615, "neg": -0, "n": 1.5e3, "s": 12345678901234567890}"#,
        r#"{"a": {"b": {"c": [1, {"d": 2}]}}, "x": {"y": {"z": 1}}, "s": "/Date(0)/"}"#,
        r#"{"k\u0076": "escaped name", "a": [[1], [2]], "kv": 2}"#,
        // Not an object, or not JSON: every body query is undefined.
        r#"[1, 2]"#,
        r#""a""#,
        r#"3"#,
        r#"null"#,
        r#""#,
        r#"{"a": 1,}"#,
        r#"{"a": 1} x"#,
        r#"{"a": 1, "z": 1e400}"#,
        r#"{"a": 1, "z": "\ud800"}"#,
        r#"{"a": 1, "z": "\x"}"#,
        r#"{"a": 1, "z": [1 2]}"#,
        r#"{"a": 1, "z": -}"#,
    ];
    compare_body_reads(&documents, &queries);
    // Nesting deeper than the parser allows fails the whole document, read or skipped.
    let deep = format!(
        r#"{{"a": 1, "z": {}1{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    let shallow = format!(
        r#"{{"a": 1, "z": {}1{}}}"#,
        "[".repeat(100),
        "]".repeat(100)
    );
    compare_body_reads(&[&deep, &shallow], &["a", "z[0][0]"]);
}

/// A random JSON value as text, with repeated and escaped member names.
fn random_json(next: &mut dyn FnMut() -> u64, depth: u32) -> String {
    const NAMES: [&str; 4] = ["a", "b", "c", "\\u0061"];
    const SCALARS: [&str; 8] = [
        "1",
        "-2.5",
        "true",
        "null",
        "\"x\"",
        "\"a\\nb\"",
        "0",
        "1e2",
    ];
    let kinds = if depth > 3 { 1 } else { 3 };
    match next() % kinds {
        0 => SCALARS[(next() % 8) as usize].to_owned(),
        1 => {
            let items: Vec<String> = (0..next() % 4)
                .map(|_| random_json(next, depth + 1))
                .collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let members: Vec<String> = (0..next() % 4)
                .map(|_| {
                    let name = NAMES[(next() % 4) as usize];
                    format!("\"{name}\":{}", random_json(next, depth + 1))
                })
                .collect();
            format!("{{{}}}", members.join(","))
        }
    }
}

#[test]
fn body_paths_read_in_one_pass_agree_on_random_documents() {
    let mut state: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let queries = [
        "a", "b", "a.a", "a.b", "a[0]", "a[1]", "b[0].a", "a.a.a", "a[0][0]", "c[-1]", "c[0].b",
    ];
    let documents: Vec<String> = (0..2_000)
        .map(|i| {
            let v = random_json(&mut next, 0);
            // Mostly objects at the top, as bodies are.
            if i % 10 == 0 || v.starts_with('{') {
                v
            } else {
                format!("{{\"a\":{v},\"b\":{v},\"c\":[{v}]}}")
            }
        })
        .collect();
    let documents: Vec<&str> = documents.iter().map(String::as_str).collect();
    compare_body_reads(&documents, &queries);
}
