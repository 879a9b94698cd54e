//! Route statements and conditions: parsing any text must never panic, and a condition that
//! compiles must evaluate on a message without panicking.
#![no_main]

use edgehub::{
    routing::condition::{Condition, MessageView, Value},
    routing::route::parse_statement,
};
use libfuzzer_sys::fuzz_target;

struct Sample(serde_json::Value);

impl MessageView for Sample {
    fn app_property(&self, name: &str) -> Option<Value> {
        (name == "a").then(|| Value::String("1".into()))
    }
    fn system_property(&self, name: &str) -> Option<Value> {
        (name == "contentType").then(|| Value::String("application/json".into()))
    }
    fn body_json(&self) -> Option<&serde_json::Value> {
        Some(&self.0)
    }
    fn twin_change(&self) -> Option<&serde_json::Value> {
        Some(&self.0)
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = parse_statement(text);
    if let Ok(c) = Condition::parse(text) {
        let msg = Sample(serde_json::json!({"a": [1, {"b": "x"}], "n": 2.5, "properties": {"reported": {"x": 1}}}));
        let _ = c.evaluate(&msg);
    }
});
