//! Form-encoded bodies (`application/x-www-form-urlencoded`: Twilio, Slack
//! commands) as a JSON object, so that handlers read `payload` as for JSON.

use serde_json::{Map, Value};

/// Each field as a string; a field given more than once becomes an array
/// of its values, in order.
pub fn form_to_json(body: &[u8]) -> Value {
    let mut object = Map::new();
    for (key, value) in url::form_urlencoded::parse(body) {
        let value = Value::String(value.into_owned());
        match object.get_mut(key.as_ref()) {
            None => {
                object.insert(key.into_owned(), value);
            }
            Some(Value::Array(values)) => values.push(value),
            Some(first) => *first = Value::Array(vec![first.take(), value]),
        }
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_become_strings_and_repeated_ones_arrays() {
        assert_eq!(
            form_to_json(b"From=%2B15551234567&Body=hi+there&Media=a&Media=b&Media=c&Empty="),
            serde_json::json!({"From": "+15551234567", "Body": "hi there", "Media": ["a", "b", "c"], "Empty": ""})
        );
        assert_eq!(form_to_json(b""), serde_json::json!({}));
    }
}
